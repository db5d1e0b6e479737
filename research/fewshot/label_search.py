"""Automatic label words for a prompt (LM-BFF, section 5.2), from K examples.

    python -m research.fewshot.label_search \
        --config experiments/fewshot_prompt.py:data=mr,data_dir=../shared/data/senteval_mr,model=/tmp/mlm_head/hf \
        --train_file /tmp/fs/mr/prompt/data/k16/seed13/train.jsonl [--top 20]

Gao, Fisch and Chen (2021): with the template fixed, for each class the
`top` vocabulary words whose log-probability at the mask, summed over the
class's training examples, is highest are its candidates; then every
assignment of one candidate per class is scored by its zero-shot accuracy on
the training examples (ties: the higher summed log-probability of the words
chosen), and the best is printed as a verbalizer ("0=word,1=word"). LM-BFF
then fine-tunes the best few assignments and keeps the one best on the dev
set; that re-ranking is the protocol's to run (`verbalizer=` of
experiments/fewshot_prompt.py). Candidates are whole words: no sub-word
pieces ("##..."), special tokens or punctuation, and no word shared by two
classes' candidate lists.
"""

from __future__ import annotations

import itertools
import logging
import sys

import numpy as np


def whole_words(tokenizer) -> np.ndarray:
  """bool [vocab]: tokens that are whole alphabetic words."""
  vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
  special = set(tokenizer.all_special_ids)
  return np.asarray([i not in special and t.isalpha() and t.isascii()
                     for i, t in enumerate(vocab)])


def search(log_probs, labels, num_labels, top=20, allowed=None):
  """The best label word per class: (token ids [num_labels], accuracy).

  Args:
    log_probs: float [n, vocab], log-softmax of the masked LM at each
      example's mask.
    labels: int [n], each example's class.
    num_labels: the classes.
    top: candidates per class.
    allowed: bool [vocab], the tokens that may be label words.

  Returns:
    (ids, accuracy): the assignment with the best accuracy on the examples.
  """
  log_probs = np.asarray(log_probs, np.float64)
  labels = np.asarray(labels)
  if allowed is not None:
    log_probs = np.where(allowed[None], log_probs, -np.inf)
  scores = np.stack([log_probs[labels == c].sum(0)
                     for c in range(num_labels)])  # [classes, vocab]
  candidates = [np.argsort(-s, kind="stable")[:top] for s in scores]
  shared = set.intersection(*(set(c.tolist()) for c in candidates))
  candidates = [[t for t in c if t not in shared] for c in candidates]
  best = None
  for ids in itertools.product(*candidates):
    predicted = np.argmax(log_probs[:, list(ids)], axis=1)
    key = ((predicted == labels).mean(),
           sum(scores[c, t] for c, t in enumerate(ids)))
    if best is None or key > best[0]:
      best = (key, ids)
  return np.asarray(best[1]), float(best[0][0])


def mask_log_probs(config, train_file):
  """log-softmax [n, vocab] at the mask of each training example, and its
  label ids, with `config`'s model (a prompt task's)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from research import data, train  # pylint: disable=import-outside-toplevel
  from research.training import partition  # pylint: disable=import-outside-toplevel
  config.data.train_file = train_file
  config.data.eval_file = ""
  config.data.source = "local"
  config.data.format = "auto"
  run = train.build(config, None)
  graphdef, state = nnx.split(
      partition.merge(run.graphdef, run.state["params"], run.frozen))

  @jax.jit
  def at_mask(state, batch):
    model = nnx.merge(graphdef, state)
    hidden, _ = model.bert(batch["input_ids"], batch["attention_mask"],
                           batch["token_type_ids"])
    h = jnp.take_along_axis(hidden, batch["mask_position"][:, None, None],
                            axis=1)[:, 0]
    return jax.nn.log_softmax(model.mlm_logits(h), axis=-1)

  out, labels = [], []
  for batch in data.Batcher(run.train_split, 16, (), shuffle=False
                            ).eval_batches():
    real = batch["weights"] > 0
    out.append(np.asarray(at_mask(state, batch))[real])
    labels.append(batch["labels"][real])
  return np.concatenate(out), np.concatenate(labels), run


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.WARNING)
  f = flags.FLAGS
  log_probs, labels, run = mask_log_probs(f.config, f.train_file)
  tokenizer = run.task.tokenizer
  ids, accuracy = search(log_probs, labels, len(run.label_names), f.top,
                         whole_words(tokenizer))
  words = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
  spec = ",".join(f"{n}={w}" for n, w in zip(run.label_names, words))
  print(f"verbalizer: {spec} (zero-shot accuracy on the {len(labels)} "
        f"training examples: {accuracy:.3f})")
  sys.stdout.flush()


def parse_flags(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  from research import cli  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "A prompt experiment.",
                                  lock_config=False)
  flags.DEFINE_string("train_file", None, "The K-shot training examples.")
  flags.DEFINE_integer("top", 20, "Candidate words per class.")
  flags.mark_flags_as_required(["config", "train_file"])
  return cli.parse_or_exit(argv)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=parse_flags)

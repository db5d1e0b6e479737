"""The teacher of a distillation run: loaded once, checked against the run.

A teacher is either

  a `research.train` workdir  its best (or latest) checkpoint, assembled as
                              the run trained it (`research.restore`), with
                              its labels.json; or
  a Hugging Face directory    (or an alias of `hf.resolve`), loaded with the
                              run's task head, which must be in the file
                              (a head initialised here would teach noise).

Either must share the run's tokenizer, head and label set, in the same
order: the student is taught the teacher's class k as its own class k.

`cache_outputs` runs the teacher once over the training split and keeps its
output distributions per example or per token, keyed by the example (and
token) index fields the method adds to the split (`INDEX_FIELDS`): the
batches of any step, after any restart, gather the same targets.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import jax
import numpy as np
from flax import nnx

from research import data
from research.configs.plugins import ConfigError
from research.data import tokenize
from research.data.splits import Field
from research.models import hf

log = logging.getLogger(__name__)

EXAMPLE, TOKEN = "distill_example", "distill_token"
# Per example (-1: a padding row) and per token (-1: padding) indices into
# the cached outputs.
INDEX_FIELDS = (Field(EXAMPLE, False, np.int32, -1),
                Field(TOKEN, True, np.int32, -1))


@dataclasses.dataclass
class Teacher:
  """A loaded teacher: its model, config, label names and what it is."""
  model: nnx.Module
  cfg: object
  label_names: tuple
  where: str


def is_run(path: str) -> bool:
  """A `research.train` workdir: config.json and no Hugging Face weights."""
  p = pathlib.Path(path)
  return ((p / "config.json").is_file()
          and not any((p / w).is_file() for w in hf.WEIGHT_FILES))


def _run_config(path):
  from research import restore  # pylint: disable=import-outside-toplevel
  return restore.read_config(path)


def model_config(path: str):
  """The teacher's `BertConfig`, from config.json files only (cheap)."""
  if is_run(path):
    return hf.read_config(hf.resolve(_run_config(path).model.name))
  return hf.read_config(hf.resolve(path))


def _hf_label_names(model_dir) -> tuple:
  """id2label of a Hugging Face config.json, () when absent or generic."""
  raw = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
  id2label = raw.get("id2label") or {}
  names = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
  generic = all(n == f"LABEL_{i}" for i, n in enumerate(names))
  return () if generic else names


def load(path: str, context, which: str, where: str) -> Teacher:
  """The teacher at `path`, checked against the run's `context`.

  Args:
    path: a workdir or a Hugging Face directory / alias.
    context: the run's `methods.Context`.
    which: a workdir's "best" or "latest" checkpoint.
    where: the option's name, for messages.

  Raises:
    ConfigError: another tokenizer, head, output size or label order, or a
      Hugging Face teacher without a trained head.
  """
  task = context.task
  if is_run(path):
    from research import restore  # pylint: disable=import-outside-toplevel
    run = restore.restore_run(path, which)
    model, labels, tokenizer = run.model, tuple(run.label_names), run.tokenizer
    if run.task.HEAD is not task.HEAD or \
        run.task.num_outputs() != task.num_outputs():
      raise ConfigError(
          f"{where}={path!r}: the teacher run's task {run.config.task!r} "
          f"({run.task.HEAD.__name__}, {run.task.num_outputs()} outputs) is "
          f"not this run's ({task.HEAD.__name__}, {task.num_outputs()})")
    what = f"run {path} ({run.which} checkpoint, step {run.step})"
  else:
    model_dir = hf.resolve(path)
    # auto: a sentence-transformers export's own pooling (research.export
    # writes a mean/cls/max-pooled classifier so), else BERT's pooler.
    model, report = hf.load_pretrained(
        str(model_dir), task.HEAD, task.num_outputs(),
        dtype=context.config.model.dtype, pooling="auto")
    # The head and, for sentence-level heads, the pooler it reads.
    head = [k for k in report.missing + report.mismatched
            if not k.startswith("bert.") or k.startswith("bert.pooler")]
    if head:
      raise ConfigError(
          f"{where}={path!r} has no trained {task.HEAD.__name__} head "
          f"(newly initialised: {', '.join(head)}): a teacher must be "
          "fine-tuned for the task (a research.train workdir, or a "
          "directory research.export wrote)")
    labels = _hf_label_names(model_dir)
    tokenizer = data.load_tokenizer(str(model_dir)) if any(
        (model_dir / f).is_file() for f in hf.TOKENIZER_FILES) else None
    what = f"Hugging Face directory {model_dir}"
  if tokenizer is not None and tokenize.tokenizer_fingerprint(tokenizer) != \
      tokenize.tokenizer_fingerprint(context.tokenizer):
    raise ConfigError(f"{where}={path!r}: the teacher's tokenizer differs "
                      "from the student's: they must read the same token ids")
  if model.cfg.vocab_size != context.model_cfg.vocab_size:
    raise ConfigError(
        f"{where}={path!r}: the teacher's vocabulary has "
        f"{model.cfg.vocab_size} tokens, the student's "
        f"{context.model_cfg.vocab_size}")
  mine = tuple(map(str, context.label_names))
  if labels and mine and tuple(map(str, labels)) != mine:
    raise ConfigError(
        f"{where}={path!r}: the teacher's labels {list(labels)} are not the "
        f"run's {list(mine)} (same names in the same order)")
  positions = model.cfg.max_position_embeddings - model.cfg.position_offset
  if context.config.data.max_length > positions:
    raise ConfigError(
        f"{where}={path!r}: the teacher has {positions} positions, fewer "
        f"than config.data.max_length={context.config.data.max_length}")
  log.info("distillation teacher: %s, %d layers of width %d", what,
           model.cfg.num_hidden_layers, model.cfg.hidden_size)
  return Teacher(model, model.cfg, tuple(labels), what)


def cache_outputs(model, task, split, batch_size: int, buckets, where: str):
  """The teacher's output distributions over `split`, once, in eval mode.

  Args:
    model: the teacher.
    task: the run's task (`forward`, `distributions`).
    split: the training split, with `INDEX_FIELDS`.
    batch_size: examples per forward pass.
    buckets: padded lengths (`config.data.buckets`; empty: chosen from the
      split's lengths), each a compilation of the forward pass.
    where: the option's name, for messages.

  Returns:
    (arrays, kinds): per distribution of `task.distributions`, a float32
    array [examples, C] (kind "per_example") or [tokens, C] ("per_token").

  Raises:
    ConfigError: a distribution that is neither one fixed-size row per
      example nor one per token (a QA task's distribution over positions).
  """
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, batch):
    outputs = task.forward(nnx.merge(graphdef, state), batch)
    return [(logits, w) for logits, w in task.distributions(outputs, batch)]

  batcher = data.Batcher(split, batch_size, buckets, shuffle=False)
  arrays, kinds = None, None
  for batch in batcher.eval_batches():
    outs = jax.device_get(forward(state, batch))
    if arrays is None:
      kinds = tuple("per_example" if w.ndim == 1 else "per_token" for _, w in outs)
      arrays = [np.zeros((len(split) if k == "per_example" else len(
          split.input_ids), logits.shape[-1]), np.float32)
                for k, (logits, _) in zip(kinds, outs)]
    for kind, array, (logits, w) in zip(kinds, arrays, outs):
      index = batch[EXAMPLE if kind == "per_example" else TOKEN]
      if logits.shape[:-1] != index.shape or logits.shape[-1] != \
          array.shape[-1]:
        raise ConfigError(
            f"{where}='cache' keeps one fixed-size output per example or "
            f"per token; task {task.name!r} gives outputs of shape "
            f"{logits.shape} for a batch of shape {index.shape}: use 'fly'")
      real = index >= 0
      array[index[real]] = logits[real]
  log.info("distillation: cached the teacher's outputs on %d training "
           "examples (%s)", len(split), ", ".join(
               f"{k} {a.shape}" for k, a in zip(kinds, arrays)))
  return tuple(arrays), kinds

"""LM-BFF's demonstrations: one training example per label beside the prompt.

Gao, Fisch and Chen (2021), section 6: each input is the prompt followed by
one demonstration of every label, a training example written with the
template and its label word in place of the mask. Demonstrations are drawn
at random, or by similarity: among the training examples of each label, the
`filter_rate` (LM-BFF: 50%) most similar to the input by the cosine of
sentence embeddings (LM-BFF: SBERT; here the packaged all-MiniLM-L6-v2,
mean-pooled, `embed`), one at random. A training example never
demonstrates itself.

Every draw is a pure function of (seed, the input's row, copy): a training
input may be featurised several times (`copies`), each with its own draw,
which stands in for LM-BFF's new draw at every step.
"""

from __future__ import annotations

import functools

import numpy as np

MODES = ("none", "random", "similar")


def choose(pool_labels, label_order, num_queries, *, seed, mode="random",
           keys=None, exclude=None, similarity=None, filter_rate=0.5,
           copy=0):
  """The pool rows that demonstrate each query: [queries, labels].

  Args:
    pool_labels: the raw label of each pool (training) row, [P].
    label_order: the labels, in the order the demonstrations follow.
    num_queries: how many inputs need demonstrations.
    seed: the run's seed.
    mode: "random" or "similar".
    keys: an int per query for its random stream (its row number); default
      0..num_queries-1.
    exclude: per query, the pool row it is (never its own demonstration),
      or -1; None: none.
    similarity: float [queries, P] (mode "similar").
    filter_rate: "similar": draw among this top fraction of each label.
    copy: which of several draws of the same query.

  Returns:
    int64 [num_queries, len(label_order)]: a pool row per label; -1 where a
    label has no other pool row.
  """
  if mode not in MODES[1:]:
    raise ValueError(f"demonstrations mode {mode!r}; valid: {MODES[1:]}")
  pool_labels = np.asarray([str(l) for l in pool_labels])
  keys = np.arange(num_queries) if keys is None else np.asarray(keys)
  exclude = (np.full(num_queries, -1) if exclude is None
             else np.asarray(exclude))
  by_label = [np.flatnonzero(pool_labels == str(l)) for l in label_order]
  out = np.full((num_queries, len(label_order)), -1, np.int64)
  for q in range(num_queries):
    rng = np.random.default_rng([seed, int(keys[q]), copy])
    for j, rows in enumerate(by_label):
      rows = rows[rows != exclude[q]]
      if not len(rows):
        continue
      if mode == "similar":
        top = max(1, int(np.ceil(filter_rate * len(rows))))
        rows = rows[np.argsort(-similarity[q, rows], kind="stable")[:top]]
      out[q, j] = rows[rng.integers(len(rows))]
  return out


@functools.lru_cache(maxsize=2)
def _embedder(model_name, max_length):
  """(tokenizer, jitted forward) of the mean-pooled sentence encoder."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from research import data  # pylint: disable=import-outside-toplevel
  from research.models import hf  # pylint: disable=import-outside-toplevel
  model, _ = hf.load_pretrained(model_name, "sentence_embedding")
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)

  tokenizer = data.load_tokenizer(str(hf.resolve(model_name)))
  return tokenizer, functools.partial(forward, state), max_length


def embed(texts, model_name="all-minilm-l6-v2", max_length=128,
          batch_size=64):
  """L2-normalised mean-pooled embeddings of texts (pairs joined by a space).

  Args:
    texts: one list of strings per text column.
    model_name: a sentence encoder (alias, directory or hub name).
    max_length: the truncation length.
    batch_size: texts per forward pass.

  Returns:
    float32 [n, hidden].
  """
  tokenizer, forward, max_length = _embedder(model_name, max_length)
  joined = [" ".join(t) for t in zip(*texts)]
  ids = tokenizer(joined, truncation=True, max_length=max_length)["input_ids"]
  # By length, each batch padded to a power of two: few compilations, little
  # padding; the rows go back to their order at the end.
  order = np.argsort([len(x) for x in ids], kind="stable")
  emb = np.zeros((len(ids), 0), np.float32)
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    longest = max(len(ids[r]) for r in rows)
    width = min(max_length, 1 << max(4, (longest - 1).bit_length()))
    batch = np.zeros((batch_size, width), np.int32)
    mask = np.zeros((batch_size, width), np.int32)
    for i, r in enumerate(rows):
      batch[i, :len(ids[r])], mask[i, :len(ids[r])] = ids[r], 1
    out = np.asarray(forward(batch, mask), np.float32)[:len(rows)]
    if not emb.shape[1]:
      emb = np.zeros((len(ids), out.shape[1]), np.float32)
    emb[rows] = out
  return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

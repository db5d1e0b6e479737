"""Dynamic batching: rows of concurrent requests share one model call.

One worker thread takes the first waiting request, then whatever arrives in
the next `max_wait_s` (or until `max_batch` rows), and runs them as one
padded batch: rows padded to the smallest of the run's length buckets that
holds the longest (`data.buckets` plus `data.max_length`, as training
pads), the batch padded to the smallest of `batch_sizes` that holds them.
So the model only ever sees len(batch_sizes) x len(buckets) shapes, each
compiled once by `warmup` before the server says it is ready: no retrace
under load. The rows taken together are cut into calls of at most
`max_batch` rows that pad the fewest tokens (`DynamicBatcher.plan`).
Padding rows get one attended token (an all-masked row would be a softmax
over nothing) and are dropped from the outputs.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import queue
import threading
import time

import numpy as np


def default_batch_sizes(max_batch: int) -> tuple:
  """1, 2, 4, ... up to max_batch (max_batch included)."""
  sizes, b = set(), 1
  while b < max_batch:
    sizes.add(b)
    b *= 2
  return tuple(sorted(sizes | {max_batch}))


@dataclasses.dataclass
class _Request:
  rows: list  # (input_ids, token_type_ids) int lists
  future: concurrent.futures.Future


class DynamicBatcher:
  """Batches rows of concurrent requests; see the module docstring.

  Args:
    backend: `(input_ids, attention_mask, token_type_ids) -> tuple of
      arrays`, each input int32 [batch, length].
    buckets: the padded lengths, ascending; the last is the longest row.
    batch_sizes: the padded batch sizes, ascending; the last is max_batch.
    max_wait_s: how long the first request of a batch waits for others.
    pad_id: the tokenizer's [PAD] id.
    on_batch: called as `on_batch(rows, batch_size, length, seconds)` after
      each model call (metrics).
    call_cost: the fixed cost of a model call in padded tokens (`plan`).
  """

  def __init__(self, backend, buckets, batch_sizes, *, max_wait_s=0.002,
               pad_id=0, on_batch=None, call_cost=16):
    self.backend = backend
    self.buckets = tuple(sorted(int(b) for b in buckets))
    self.batch_sizes = tuple(sorted(int(b) for b in batch_sizes))
    self.max_batch = self.batch_sizes[-1]
    self.max_wait_s = max_wait_s
    self.pad_id = pad_id
    self.on_batch = on_batch
    self.call_cost = call_cost
    self._queue = queue.Queue()
    self._thread = None

  @property
  def alive(self) -> bool:
    return self._thread is not None and self._thread.is_alive()

  def start(self):
    if self._thread is None:
      self._thread = threading.Thread(target=self._loop, daemon=True,
                                      name="dynamic-batcher")
      self._thread.start()

  def close(self):
    if self.alive:
      self._queue.put(None)
      self._thread.join()

  def submit(self, rows) -> concurrent.futures.Future:
    """Queues rows (dicts with input_ids and token_type_ids lists); the
    future gives each row's outputs: a tuple of arrays without the batch
    axis, per-token outputs still padded to the batch's bucket."""
    future = concurrent.futures.Future()
    if not rows:
      future.set_result([])
      return future
    longest = max(len(r["input_ids"]) for r in rows)
    if longest > self.buckets[-1]:
      raise ValueError(f"a row of {longest} tokens is longer than the "
                       f"longest bucket, {self.buckets[-1]}")
    if not self.alive:
      raise RuntimeError("the batcher is not running")
    self._queue.put(_Request(
        [(r["input_ids"], r["token_type_ids"]) for r in rows], future))
    return future

  def run(self, rows) -> list:
    """`submit` and wait (a caller's thread)."""
    return self.submit(rows).result()

  # --- The worker ---------------------------------------------------------------

  def bucket(self, length: int) -> int:
    return self.buckets[bisect.bisect_left(self.buckets, length)]

  def batch_size(self, rows: int) -> int:
    return self.batch_sizes[bisect.bisect_left(self.batch_sizes, rows)]

  def pad(self, rows, batch_size: int, length: int):
    """(input_ids, attention_mask, token_type_ids), int32 [batch_size,
    length]; rows past len(rows) are padding with one attended token."""
    ids = np.full((batch_size, length), self.pad_id, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    types = np.zeros((batch_size, length), np.int32)
    for i, (row_ids, row_types) in enumerate(rows):
      ids[i, :len(row_ids)] = row_ids
      types[i, :len(row_types)] = row_types
      mask[i, :len(row_ids)] = 1
    mask[len(rows):, 0] = 1
    return ids, mask, types

  def warmup(self, progress=None):
    """Runs (so compiles) every (batch size, bucket) shape once.

    Args:
      progress: called as `progress(done, total)` after each shape.
    """
    shapes = [(b, l) for l in self.buckets for b in self.batch_sizes]
    for i, (b, l) in enumerate(shapes):
      self.backend(*self.pad([], b, l))
      if progress is not None:
        progress(i + 1, len(shapes))

  def _collect(self, first):
    requests, rows = [first], len(first.rows)
    deadline = time.monotonic() + self.max_wait_s
    while rows < self.max_batch:
      try:
        request = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
      except queue.Empty:
        break
      if request is None:
        self._queue.put(None)  # stop after this batch
        break
      requests.append(request)
      rows += len(request.rows)
    return requests

  def _loop(self):
    while True:
      first = self._queue.get()
      if first is None:
        return
      requests = self._collect(first)
      try:
        results = self._run([row for r in requests for row in r.rows])
      except Exception as e:  # pylint: disable=broad-except
        for r in requests:
          r.future.set_exception(e)
        continue
      start = 0
      for r in requests:
        r.future.set_result(results[start:start + len(r.rows)])
        start += len(r.rows)

  def plan(self, lengths) -> list:
    """Cuts rows into model calls at the least cost.

    On a CPU the model's time is about proportional to the padded tokens
    (batch size x bucket), plus a fixed cost per call: rows sorted by
    length are cut into calls of at most max_batch rows so that the padded
    tokens plus `call_cost` per call are fewest (dynamic programming over
    the cut points). Rows of very different lengths then run apart, each
    call padded to its own bucket.

    Args:
      lengths: each row's length.

    Returns:
      Lists of row indices, one per call.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
      width = self.bucket(lengths[order[j - 1]])
      for i in range(max(0, j - self.max_batch), j):
        cost = best[i] + self.batch_size(j - i) * width + self.call_cost
        if cost < best[j]:
          best[j], cut[j] = cost, i
    calls, j = [], n
    while j > 0:
      calls.append(order[cut[j]:j])
      j = cut[j]
    return calls[::-1]

  def _run(self, rows) -> list:
    """Outputs of every row, in order, through the calls `plan` chose."""
    out = [None] * len(rows)
    for chunk in self.plan([len(ids) for ids, _ in rows]):
      part = [rows[i] for i in chunk]
      length = self.bucket(max(len(ids) for ids, _ in part))
      size = self.batch_size(len(part))
      began = time.perf_counter()
      outputs = self.backend(*self.pad(part, size, length))
      if self.on_batch is not None:
        self.on_batch(len(part), size, length, time.perf_counter() - began)
      for j, i in enumerate(chunk):
        out[i] = tuple(o[j] for o in outputs)
    return out

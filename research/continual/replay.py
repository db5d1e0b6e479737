"""Experience replay: a reservoir of earlier training examples.

Vitter's algorithm R: after `seen` examples went past a reservoir of
`capacity`, every one of them is in it with probability capacity / seen,
whatever the order, in one pass and constant memory. A round replays a
uniform draw from it beside its new examples (`research.continual.rounds`),
so the model keeps seeing the old distribution in proportion.

The state (items, count, the generator's state) is plain JSON: a round
saves it with the stream's state in one atomic write, and a restarted round
draws the same sample.
"""

from __future__ import annotations

import numpy as np


class Reservoir:
  """A uniform sample of at most `capacity` items of a stream.

  Args:
    capacity: the most items kept.
    seed: the generator's seed (ignored when `state` is given).
    state: a `state()` to continue from.
  """

  def __init__(self, capacity: int, seed: int = 0, state: dict | None = None):
    if capacity < 1:
      raise ValueError(f"config.continual.replay_capacity={capacity} must "
                       "be >= 1")
    self.capacity = capacity
    self.items: list = []
    self.seen = 0
    self.rng = np.random.default_rng(seed)
    if state is not None:
      self.items = list(state["items"])
      self.seen = int(state["seen"])
      self.rng.bit_generator.state = state["rng"]

  def add(self, items) -> None:
    """Offers each item in order (algorithm R)."""
    for item in items:
      self.seen += 1
      if len(self.items) < self.capacity:
        self.items.append(item)
      else:
        j = int(self.rng.integers(self.seen))  # uniform on [0, seen)
        if j < self.capacity:
          self.items[j] = item

  def sample(self, k: int, seed) -> list:
    """`k` items drawn without replacement (all when fewer), by a generator
    of its own (`seed`: e.g. (stream seed, round)), so drawing never moves
    the reservoir's state."""
    k = min(k, len(self.items))
    idx = np.random.default_rng(seed).choice(len(self.items), k, replace=False)
    return [self.items[i] for i in sorted(idx)]

  def state(self) -> dict:
    return {"items": list(self.items), "seen": self.seen,
            "rng": self.rng.bit_generator.state}

"""Robustness: clean metrics beside the same metrics under attack and noise.

One evaluator reports, over its split, the sequence evaluator's metrics
(`accuracy`, ...) and the same metrics

  pgd_<metric>    under an embedding-space PGD attack: per example, `steps`
                  projected ascent steps of size `step_size` on the loss,
                  inside a ball of radius `epsilon` (`norm` l2 | linf)
                  around the word embeddings of its real tokens
                  (`research.methods.adversarial.embeddings`); epsilon 0: skipped;
  typo_<metric>   on the split with character typos (a word of letters gets,
                  with probability `typo_rate`, two adjacent characters
                  swapped, one dropped or a letter inserted;
                  `research.data.augment.typos`), the same noise at every
                  evaluation (drawn from `typo_seed`); rate 0: skipped.

    config.evals.dev = dict(type="robust", split="validation", epsilon=1.0,
                            typo_rate=0.1)

Sequence-level tasks (one label per example).
"""

from __future__ import annotations

import jax

from research import data
from research.evaluators import common, sequence
from research.data import augment
from research.methods.adversarial import embeddings as adversarial


class Evaluator(common.Evaluator):
  """See the module docstring."""
  CONFIG = {**common.Evaluator.CONFIG, "epsilon": 1.0, "step_size": 0.5,
            "steps": 3, "norm": "l2", "typo_rate": 0.1, "typo_seed": 0}

  def __init__(self, *, make_step, **kw):
    super().__init__(make_step=make_step, **kw)
    o = self.options
    self.clean = sequence.Evaluator(make_step=make_step, **kw)
    adversarial.check_options(o, f"config.evals.{self.name}")
    # The run's own facts: its model's width and its tokenizer's specials.
    self.hidden = self.context.model_cfg.hidden_size
    self.special = adversarial.special_ids(self.task.tokenizer)
    self.attacked = None
    if o["epsilon"] > 0:
      self.attacked = sequence.Evaluator(make_step=lambda logits: make_step(
          logits, self.attack), **{**kw, "name": f"{self.name}/pgd"})
    self.noisy = None
    if o["typo_rate"] > 0:
      words = augment.Words(self.task.tokenizer, self.special)
      split = augment.typos(self.split, words, rate=o["typo_rate"],
                            seed=o["typo_seed"])
      b = self.batcher
      batcher = data.Batcher(split, b.batch_size, b.buckets, shuffle=False,
                             process_index=b.process_index,
                             process_count=b.process_count)
      self.noisy = sequence.Evaluator(make_step=make_step, **{
          **kw, "name": f"{self.name}/typo", "split": split,
          "batcher": batcher})

  @classmethod
  def metric_names(cls, config, options) -> tuple:
    names = super().metric_names(config, options)
    return names + tuple(f"{kind}_{n}" for kind in ("pgd", "typo")
                         for n in names + ("loss",))

  def attack(self, forward):
    """The eval forward on the batch moved by the PGD attack."""
    o = self.options

    def attacked(params, frozen, batch):
      mask = adversarial.perturbable(batch, self.special)

      def loss(delta):
        return forward(params, frozen, adversarial.with_delta(batch, delta))[
            "loss"]

      zero = adversarial.zeros(batch, self.hidden)
      delta = adversarial.pgd(
          loss, jax.grad(loss)(zero), batch, mask, steps=o["steps"],
          step_size=o["step_size"], epsilon=o["epsilon"], norm=o["norm"])
      return forward(params, frozen, adversarial.with_delta(batch, delta))

    return attacked

  def precompile(self, params, frozen) -> int:
    return sum(e.precompile(params, frozen)
               for e in (self.clean, self.attacked, self.noisy)
               if e is not None)

  def predict(self, params, frozen) -> dict:
    """The clean predictions (`sequence.Evaluator.predict`)."""
    return self.clean.predict(params, frozen)

  def run(self, params, frozen):
    results = self.clean.run(params, frozen)
    for kind, evaluator in (("pgd", self.attacked), ("typo", self.noisy)):
      if evaluator is not None:
        results.update({f"{kind}_{k}": v for k, v in
                        evaluator.run(params, frozen).items()})
    return results

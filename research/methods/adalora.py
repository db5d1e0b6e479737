"""AdaLoRA: LoRA in SVD form with importance-based rank allocation.

Zhang et al. (2023), "Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning", as Hugging Face PEFT's `AdaLoraConfig` defines it. Each target
layer computes `W x + alpha / (r + 1e-5) * ((x P) * lambda) Q` with P [in, r],
lambda [r], Q [r, out] trained (`research.methods.peft.layers.AdaLoRADense`); the
loss gains `orth_reg_weight` times the mean of ||P^T P - I||_F and
||Q Q^T - I||_F; and after each update the least important triplets get
lambda = 0 until `target_r * layers` remain, on PEFT's cubic budget schedule
(`research.methods.peft.allocation`). The task head is trained whole.

    config.methods = ("adalora",)
    config.method_options.adalora = dict(init_r=12, target_r=8, tinit=200,
                                         tfinal=200, delta_t=10)

Options are `AdaLoraConfig`'s (`lora_alpha` is `alpha`, `deltaT` is
`delta_t`, `lora_dropout` is `dropout`); `total_step` 0 means the run's
number of updates.
"""

import jax
import jax.numpy as jnp

from research.configs.plugins import ConfigError
from research.methods import lora
from research.methods.peft import allocation, layers

CONFIG = {"init_r": 12, "target_r": 8, "alpha": 8.0, "dropout": 0.0,
          "target_modules": ("query", "value"), "head": True, "pooler": False,
          "tinit": 0, "tfinal": 0, "delta_t": 1, "total_step": 0,
          "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5}


def orthogonality(trainable) -> jax.Array:
  """Mean over P and Q matrices of ||P^T P - I||_F and ||Q Q^T - I||_F."""
  named = allocation.named_leaves(trainable)
  terms = []
  for name, x in named.items():
    if name.endswith("/lora_a"):  # P [in, r]
      cov = x.T @ x
    elif name.endswith("/lora_b"):  # Q [r, out]
      cov = x @ x.T
    else:
      continue
    terms.append(jnp.linalg.norm(cov - jnp.eye(cov.shape[0], dtype=cov.dtype)))
  return jnp.mean(jnp.stack(terms)) if terms else jnp.zeros(())


class Method(lora.Method):
  """See the module docstring."""
  CONFIG = CONFIG
  LAYER = layers.AdaLoRADense
  NAME = "adalora"

  def __init__(self, config, **options):
    super().__init__(config, **options)
    o = self.options
    if int(o["target_r"]) > int(o["init_r"]):
      raise ConfigError(f"config.method_options.adalora.target_r="
                        f"{o['target_r']} exceeds init_r={o['init_r']}")
    if int(o["delta_t"]) < 1:
      raise ConfigError("config.method_options.adalora.delta_t must be >= 1")
    if config.optimizer.grad_accum_steps > 1:
      raise ConfigError(
          "config.methods has 'adalora', whose rank allocation runs once per "
          "optimiser call: set config.optimizer.grad_accum_steps=1 "
          f"(got {config.optimizer.grad_accum_steps})")

  def check_rank_fields(self):
    return ("init_r", "target_r")

  def layer_options(self) -> dict:
    o = self.options
    return {"lora_rank": int(o["init_r"]), "lora_alpha": float(o["alpha"]),
            "lora_dropout": float(o["dropout"])}

  def total_step(self, total_steps: int) -> int:
    return int(self.options["total_step"]) or int(total_steps)

  def optimizer(self, tx, total_steps):
    o = self.options
    total = self.total_step(total_steps)
    if o["tinit"] >= total - o["tfinal"]:
      raise ConfigError(
          f"config.method_options.adalora: tinit={o['tinit']} must be below "
          f"total_step - tfinal = {total} - {o['tfinal']} (the run has "
          f"{total_steps} updates)")
    return allocation.adalora_allocation(
        tx, init_r=int(o["init_r"]), target_r=int(o["target_r"]),
        tinit=int(o["tinit"]), tfinal=int(o["tfinal"]),
        delta_t=int(o["delta_t"]), total_step=total, beta1=float(o["beta1"]),
        beta2=float(o["beta2"]))

  def wrap_loss(self, loss_fn):
    loss_fn = super().wrap_loss(loss_fn)
    weight = float(self.options["orth_reg_weight"])
    if weight <= 0:
      return loss_fn

    def loss(trainable, frozen, batch, key):
      value, aux = loss_fn(trainable, frozen, batch, key)
      return value + weight * orthogonality(trainable), aux

    return loss

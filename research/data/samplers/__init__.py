"""Epoch orders of the training examples, one module per sampler.

`config.data.sampler = "<name>"` is `research/data/samplers/<name>.py` (a
dotted name is a module path), whose `Sampler(lengths, batch_size, *, seed,
**options)` plans each epoch as a pure function of (seed, epoch), so that
`Batcher.batch_at(step)` is the same on every host and after any restart:

  sampler.batch_size        rows of every batch (Poisson: its fixed maximum)
  sampler.steps_per_epoch   batches per epoch
  sampler.epoch(e, buckets) int64 [steps_per_epoch, batch_size] example
                            indices; -1 is a padding row (weight 0)

Options come from `config.data.sampler_options`, checked against the module's
`CONFIG`. Shipped: `bucketed` (the default: length-grouped), `shuffle`
(uniform random batches; the default for packed rows), `sequential` (the
split's order) and `poisson` (each example independently with probability
batch_size / n, as DP-SGD's accounting assumes).
"""

from research.configs import plugins

PACKAGE = "research.data.samplers"


def module(name):
  """The sampler module `name` (ConfigError listing the valid ones)."""
  return plugins.module(PACKAGE, name, "config.data.sampler", "Sampler")


def create(name, lengths, batch_size, seed, options=None):
  """`Sampler` of module `name` with its checked options."""
  mod = module(name)
  kw = plugins.options(options, getattr(mod, "CONFIG", {}),
                       "config.data.sampler_options", f"sampler {name}")
  return mod.Sampler(lengths, batch_size, seed=seed, **kw)

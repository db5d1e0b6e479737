"""Training methods: one module per method, applied in `config.methods` order.

`config.methods = ("bitfit",)` is `research/methods/bitfit.py`; a dotted
name is a module path (a method defined in a test or a project folder). The
module's `Method(config, **options)` (options: `config.method_options.<name>`,
for a dotted name its last part, checked against `Method.CONFIG`) changes the
run through these seams, each optional:

  trainable()          an nnx filter of the weights to train (intersected
                       over methods and with nnx.Param): the rest is frozen,
                       gets no optimiser state and is not checkpointed
                       (`research.training.partition`);
  wrap_loss(loss_fn)   a new loss function with the same contract
                       (`research.training.steps`): an extra term, a
                       perturbation, a teacher's targets;
  grad_fn(grad_fn)     a new gradient function (per-example gradients,
                       clipping and noise for DP-SGD);
  dense_factory(f)     the factory that builds every dense layer of the model
                       (`research.models.bert.make_dense`): LoRA, AdaLoRA,
                       adapters (`Task.load_model` applies it and
                       `adapt_model`);
  adapt_model(model)   the loaded model, changed (prefix tuning attaches its
                       prefixes); the same for training, export and predict;
  optimizer(tx, total_steps)  the optax transformation, wrapped (AdaLoRA's
                       rank allocation keeps its state in the optimiser's, so
                       it is checkpointed and resumes exactly).

and, for a method that governs the whole run (DP-SGD, `dp_sgd.py`, which
`config.privacy.enabled` adds last to the methods):

  sampler(name, options)  the training order `(config.data.sampler, its
                       options)`, possibly replaced (Poisson sampling);
  prepare(train_split=, total_steps=, workdir=)  called by `train.build`
                       once the data and the planned steps are known, before
                       the update step is built (noise calibration);
  step_limit()         `(steps, reason)`: the run stops after `steps`
                       (a privacy budget), or None;
  metrics(step)        scalars logged with the training metrics (epsilon
                       spent); summary(step): what summary.json gets.
"""

from flax import nnx

from research.configs import plugins

PACKAGE = "research.methods"


class Method:
  """Base of the methods: changes nothing. Subclasses override a seam."""
  CONFIG = {}

  def __init__(self, config, **options):
    self.config = config
    self.options = options

  def trainable(self):
    """An nnx filter of the weights to train."""
    return nnx.Param

  def wrap_loss(self, loss_fn):
    return loss_fn

  def grad_fn(self, grad_fn):
    return grad_fn

  def sampler(self, name, options):
    return name, options

  def prepare(self, *, train_split, total_steps, workdir):
    del train_split, total_steps, workdir

  def step_limit(self):
    return None

  def metrics(self, step):
    del step
    return {}

  def summary(self, step):
    return self.metrics(step)

  def dense_factory(self, factory):
    return factory

  def adapt_model(self, model):
    return model

  def optimizer(self, tx, total_steps):
    del total_steps
    return tx


def option_key(name):
  """A method's key in config.method_options: its name, or a path's last part."""
  return name.rsplit(".", 1)[-1]


# Added last to the methods by `config.privacy.enabled`; its options are
# config.privacy (a property of the whole run, not of one method).
PRIVACY_METHOD = "dp_sgd"


def names(config):
  """config.methods, then PRIVACY_METHOD when config.privacy.enabled."""
  out = tuple(config.get("methods", ()))
  privacy = config.get("privacy")
  if privacy is not None and privacy.enabled and PRIVACY_METHOD not in out:
    out += (PRIVACY_METHOD,)
  return out


def load(config):
  """The run's methods, in config order (ConfigError for bad names/options)."""
  out = []
  given = config.get("method_options")
  for i, name in enumerate(names(config)):
    mod = plugins.module(PACKAGE, name, f"config.methods[{i}]", "Method")
    key = option_key(name)
    opts = plugins.options(
        given.get(key) if given is not None else None, mod.Method.CONFIG,
        f"config.method_options.{key}", f"method {name!r}")
    out.append(mod.Method(config, **opts))
  return out


def _thread(methods, seam, value, *args):
  """`value` passed through each method's `seam` in config order."""
  for m in methods:
    value = getattr(m, seam)(value, *args)
  return value


def trainable(methods):
  """The filter of the weights to train: nnx.Param and every method's."""
  return nnx.All(nnx.Param, *(m.trainable() for m in methods))


def wrap_loss(methods, loss_fn):
  """`loss_fn` wrapped by each method in order (the last is outermost)."""
  return _thread(methods, "wrap_loss", loss_fn)


def grad_fn(methods, grad_fn):
  """`grad_fn` replaced by each method in order."""
  return _thread(methods, "grad_fn", grad_fn)


def sampler(methods, name, options):
  """The training sampler and its options after each method's say."""
  for m in methods:
    name, options = m.sampler(name, options)
  return name, options


def step_limit(methods):
  """The smallest `(steps, reason)` of the methods' limits, or None."""
  limits = [lim for m in methods if (lim := m.step_limit()) is not None]
  return min(limits, key=lambda lim: lim[0]) if limits else None


def metrics(methods, step, summary=False):
  """Every method's logged metrics at `step` (its summary's with summary)."""
  out = {}
  for m in methods:
    out.update(m.summary(step) if summary else m.metrics(step))
  return out


def dense_factory(methods, factory):
  """The dense-layer factory after each method's, in order."""
  return _thread(methods, "dense_factory", factory)


def adapt_model(methods, model):
  """The loaded model after each method's `adapt_model`, in order."""
  return _thread(methods, "adapt_model", model)


def optimizer(methods, tx, total_steps):
  """`tx` wrapped by each method in order."""
  return _thread(methods, "optimizer", tx, total_steps)

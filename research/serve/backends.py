"""Model backends: padded int32 arrays in, the head's outputs (numpy) out.

Every backend is a callable `(input_ids, attention_mask, token_type_ids)`,
each [batch, length] int32, returning a tuple of numpy arrays with the batch
axis first (one array for most heads, (start, end) for QA). They run the
same function, `model_fn`: the run's task's own forward (`Task.forward`)
over its restored model (trained part merged with the frozen one, as
`research.restore.restore_run` gives it):

- `JaxBackend`: that function jitted, on the run's restored parameters;
- `ExportedBackend`: a StableHLO export of it (`research.export --format
  stablehlo`, `jax.export` with symbolic batch and length), on its weights;
- `OnnxBackend`: an ONNX export of it (`--format onnx`, jax2onnx) in
  onnxruntime;
- `EnsembleBackend`: several of these (a logit ensemble's members, which
  share tokenizer, task and labels: `research.soup.read_ensemble`), each
  output averaged over them (`mean_outputs`, as `research.soup` averages
  offline).

The JAX backends count their traces (`traces`): one per padded shape; the
server compiles every (batch size, bucket) at start-up, so a trace under
load would be a bug.
"""

from __future__ import annotations

import numpy as np

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def mean_outputs(arrays) -> np.ndarray:
  """The element-wise mean of same-shaped outputs (summed in float64, then
  float32): a logit ensemble's, served or offline alike."""
  total = np.zeros(np.shape(arrays[0]), np.float64)
  for a in arrays:
    total += np.asarray(a, np.float64)
  return (total / len(arrays)).astype(np.float32)


def model_fn(task, graphdef):
  """`(params, frozen, input_ids, attention_mask, token_type_ids) -> tuple
  of outputs` of a restored run: its task's evaluation forward
  (`Task.forward`, no dropout) on its model's parts."""
  from research.training import partition  # pylint: disable=import-outside-toplevel

  def forward(params, frozen, input_ids, attention_mask, token_type_ids):
    model = partition.merge(graphdef, params, frozen)
    out = task.forward(model, {"input_ids": input_ids,
                               "attention_mask": attention_mask,
                               "token_type_ids": token_type_ids})
    return tuple(out) if isinstance(out, tuple) else (out,)

  return forward


class JaxBackend:
  """A restored run's forward, jitted (see the module docstring)."""
  name = "jax"

  def __init__(self, task, graphdef, params, frozen):
    import jax  # pylint: disable=import-outside-toplevel
    forward = model_fn(task, graphdef)
    self.traces = 0

    def counted(*args):
      self.traces += 1  # runs once per trace, not per call
      return forward(*args)

    self._fn = jax.jit(counted)
    self._params, self._frozen = params, frozen

  def __call__(self, input_ids, attention_mask, token_type_ids):
    out = self._fn(self._params, self._frozen, input_ids, attention_mask,
                   token_type_ids)
    return tuple(np.asarray(x) for x in out)


class ExportedBackend:
  """A StableHLO export (`jax.export.Exported`) called on its weights."""
  name = "stablehlo"

  def __init__(self, exported, weights):
    import jax  # pylint: disable=import-outside-toplevel
    self.traces = 0

    def counted(weights, *arrays):
      self.traces += 1
      return exported.call(weights, *arrays)

    self._fn = jax.jit(counted)
    self._weights = [jax.numpy.asarray(w) for w in weights]

  def __call__(self, input_ids, attention_mask, token_type_ids):
    out = self._fn(self._weights, input_ids, attention_mask, token_type_ids)
    return tuple(np.asarray(x) for x in out)


class OnnxBackend:
  """An ONNX export in onnxruntime (CPU unless `providers` say otherwise)."""
  name = "onnx"
  traces = 0  # onnxruntime takes any shape without compiling

  def __init__(self, path, threads: int = 0, providers=None):
    import onnxruntime as ort  # pylint: disable=import-outside-toplevel
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: onnxruntime's choice
    self.session = ort.InferenceSession(
        str(path), options, providers=providers or ["CPUExecutionProvider"])
    names = [i.name for i in self.session.get_inputs()]
    if sorted(names) != sorted(INPUTS):
      raise ValueError(f"{path}: inputs {names}; a research.export ONNX "
                       f"model takes {', '.join(INPUTS)}")

  def __call__(self, input_ids, attention_mask, token_type_ids):
    return tuple(self.session.run(None, {
        "input_ids": input_ids, "attention_mask": attention_mask,
        "token_type_ids": token_type_ids}))


class EnsembleBackend:
  """Every member backend on the same padded rows, each output averaged.

  The members run one after another: they are separate models (a stack of
  same-shaped weights under `jax.vmap` would fuse them, at N times the
  memory per call; one member's call already uses every core).
  """

  def __init__(self, members):
    if not members:
      raise ValueError("an ensemble needs at least one member")
    self.members = list(members)
    self.name = f"ensemble of {len(self.members)} ({self.members[0].name})"

  @property
  def traces(self) -> int:
    return sum(getattr(m, "traces", 0) for m in self.members)

  def __call__(self, input_ids, attention_mask, token_type_ids):
    outs = [m(input_ids, attention_mask, token_type_ids) for m in self.members]
    return tuple(mean_outputs([o[k] for o in outs])
                 for k in range(len(outs[0])))

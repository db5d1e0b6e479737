"""Model soups and logit ensembles of runs fine-tuned from one start.

    python -m research.soup --runs /tmp/s0,/tmp/s1,/tmp/s2 \\
        --select_file dev_a.tsv --eval_file dev_b.tsv \\
        --out /tmp/soups --ensemble_out /tmp/ensemble
    python -m research.serve --workdir /tmp/soups/versions/v0002   # the greedy soup
    python -m research.serve --workdir /tmp/ensemble               # the ensemble

Wortsman et al. 2022 ("Model soups"): runs fine-tuned from the same
pre-trained weights and the same head initialisation (`config.model.init_seed`
fixed while `config.seed` varies) can be averaged weight by weight into one
model. The uniform soup averages them all; the greedy soup sorts them by
their held-out score, starts from the best and adds each next run only if
the held-out score of the average does not drop. A logit ensemble instead
runs every member and averages their logits (N forward passes).

What is averaged is each run's model as `research.export` readies it
(`Method.export_model`: LoRA's updates folded in, pruning masks folded):
every weight, trained or frozen, since a frozen weight identical in every
run averages to itself, and one that differs (a BitFit run beside a full
one) is still a weight of the same network. Averaging LoRA's A and B factors
separately would not average the runs' updates, so they are folded first;
methods whose layers cannot be folded (adapters, prefixes) are refused. The
soup is one plain model (`Restored.with_model` of the first run, its
methods dropped: already applied): evaluate it with `make_evaluator`, export
it with `export.export_restored`, store it with
`continual.registry.Registry.add(soup, kind="soup")` and serve the version.

Runs are refused (ValueError naming both workdirs and the field) when they
differ in what a soup or an ensemble cannot bridge: checkpoint, task, labels,
tokenizer, length, architecture, or the parameters' tree and shapes. A
different head initialisation is allowed with a warning (the paper's soups
share it; independently drawn heads average poorly).

An ensemble directory (`write_ensemble`) holds `ensemble.json`, the list of
its members (registry versions written beside it, or run workdirs), which
`research.serve.engine.load` serves by averaging its members' logits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from typing import Callable

import jax
import numpy as np

from research import methods as methods_lib
from research import restore
from research.evaluators import sequence
from research.metrics import common as metrics_lib
from research.serve.backends import mean_outputs
from research.training import partition

ENSEMBLE_FILE = "ensemble.json"


# --- Loading and checking ---------------------------------------------------


def load_runs(workdirs, which: str = "best") -> list:
  """`restore.restore_run` of each workdir (at least one)."""
  workdirs = [w for w in workdirs if w]
  if not workdirs:
    raise ValueError("no runs given (--runs a,b,c)")
  return [restore.restore_run(w, which) for w in workdirs]


def _io_fields(r) -> dict:
  """What every member of an ensemble must share: how a text becomes the
  model's input and what its output means."""
  c = r.config
  return {
      "task": c.task,
      "task_options": _plain(c.get("task_options")),
      "num_labels": int(c.num_labels),
      "label names (labels.json)": tuple(r.label_names),
      "data.text_fields": tuple(c.data.text_fields),
      "data.max_length": int(c.data.max_length),
  }


def _plain(value):
  return value.to_dict() if hasattr(value, "to_dict") else dict(value or {})


def _tokenizer_id(r):
  tok = r.tokenizer
  tok = getattr(tok, "serialized_inner", tok)
  return type(tok).__name__, len(tok), tok.get_vocab()


def check_compatible(runs, *, soup: bool = True) -> None:
  """Refuses runs a soup (or, with `soup=False`, an ensemble) cannot join.

  Raises:
    ValueError: naming the two workdirs and the field that differs.
  """
  first = runs[0]
  fields = _io_fields(first)
  for other in runs[1:]:
    theirs = _io_fields(other)
    if soup:
      fields.update(_soup_fields(first))
      theirs.update(_soup_fields(other))
    for name, value in fields.items():
      if theirs[name] != value:
        raise ValueError(
            f"{first.workdir} and {other.workdir} differ in {name}: "
            f"{value!r} vs {theirs[name]!r}; a "
            f"{'soup' if soup else 'logit ensemble'} needs runs that agree")
    if _tokenizer_id(other) != _tokenizer_id(first):
      raise ValueError(
          f"{first.workdir} and {other.workdir} differ in their tokenizer "
          f"(vocabulary of {_tokenizer_id(first)[1]} vs "
          f"{_tokenizer_id(other)[1]}): their inputs would not mean the same")
    if soup:
      a, b = (methods_lib.init_seed(r.config) for r in (first, other))
      if a != b:
        warnings.warn(
            f"{first.workdir} and {other.workdir} initialised their heads "
            f"with different seeds ({a} vs {b}; config.model.init_seed, -1: "
            "config.seed): model soups average runs of one initialisation; "
            "these may average poorly", stacklevel=2)


def _soup_fields(r) -> dict:
  """What the members of a soup must share besides `_io_fields`."""
  m = r.config.model
  return {
      "model.name": os.path.realpath(r.context.model_dir),
      "model.layer_norm": m.get("layer_norm", "checkpoint"),
      "model.bias": m.get("bias", "checkpoint"),
      "model.pooling": str(getattr(getattr(r.model, "bert", None), "pooling",
                                   None)),
  }


# --- Soups --------------------------------------------------------------------


class Ingredients:
  """Runs made ready to average: each one's model as export readies it,
  flattened to host arrays once; `soup(indices)` averages any subset.

  Every soup shares one structure and evaluation step (`template`), so an
  evaluator built once from `template` scores every candidate without
  compiling again.
  """

  def __init__(self, runs):
    check_compatible(runs, soup=True)
    self.runs = list(runs)
    self.leaves, rests = [], []
    first = None
    for r in self.runs:
      _, params, _, rest = partition.split_model(self._ready(r))
      flat, treedef = jax.tree_util.tree_flatten_with_path(params)
      rest_flat = jax.tree_util.tree_flatten_with_path(rest)[0]
      if first is None:
        first = (r, treedef, flat)
      else:
        _check_same_tree(first[0], r, first[1], treedef, first[2], flat)
        _check_same_rest(first[0], r, rests[0], rest_flat)
      self.leaves.append([np.asarray(v) for _, v in flat])
      rests.append(rest_flat)
    self.treedef = first[1]
    self.template = _as_soup(self.runs[0], self._ready(self.runs[0]))

  @staticmethod
  def _ready(r):
    """The run's whole model with its methods applied (LoRA folded)."""
    try:
      return methods_lib.export_model(r.methods, r.model)
    except ValueError as e:
      raise ValueError(f"{r.workdir}: a soup averages the model as "
                       f"research.export readies it, and {e}") from None

  def average(self, indices) -> list:
    """The mean of the chosen runs' weights, leaf by leaf (in float64, then
    the weights' own dtype: one run is returned exactly)."""
    indices = list(indices)
    if not indices:
      raise ValueError("a soup of no runs")
    out = []
    for leaves in zip(*(self.leaves[i] for i in indices)):
      if not np.issubdtype(leaves[0].dtype, np.inexact):
        out.append(leaves[0])  # checked equal in every run
        continue
      total = np.zeros(leaves[0].shape, np.float64)
      for leaf in leaves:
        total += leaf.astype(np.float64)
      out.append((total / len(leaves)).astype(leaves[0].dtype))
    return out

  def soup(self, indices) -> restore.Restored:
    """The averaged model of the runs at `indices`, as a `Restored`."""
    params = jax.tree_util.tree_unflatten(self.treedef, self.average(indices))
    placed = jax.tree.map(lambda ref, x: jax.device_put(x, ref.sharding),
                          self.template.params, params)
    return dataclasses.replace(self.template, params=placed)


def _check_same_tree(a, b, tree_a, tree_b, flat_a, flat_b):
  keys_a = {jax.tree_util.keystr(p): v for p, v in flat_a}
  keys_b = {jax.tree_util.keystr(p): v for p, v in flat_b}
  for path in keys_a.keys() ^ keys_b.keys():
    where = a.workdir if path in keys_a else b.workdir
    raise ValueError(
        f"{a.workdir} and {b.workdir} differ in the model's parameters: "
        f"{path} only in {where} (their methods change the network: "
        f"{tuple(a.config.methods)} vs {tuple(b.config.methods)})")
  for path, x in keys_a.items():
    y = keys_b[path]
    if x.shape != y.shape or x.dtype != y.dtype:
      raise ValueError(
          f"{a.workdir} and {b.workdir} differ in the model's parameters: "
          f"{path} is {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
  if tree_a != tree_b:
    raise ValueError(f"{a.workdir} and {b.workdir} differ in the model's "
                     "parameter tree (the same names, another structure)")


def _check_same_rest(a, b, rest_a, rest_b):
  """The non-weight variables (a quantisation scale) are constants a soup
  cannot average: they must be equal."""
  if len(rest_a) != len(rest_b):
    raise ValueError(f"{a.workdir} and {b.workdir} differ in the model's "
                     "non-weight variables (a mask, a scale)")
  for (path, x), (_, y) in zip(rest_a, rest_b):
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape or not np.array_equal(x, y):
      raise ValueError(
          f"{a.workdir} and {b.workdir} differ in {jax.tree_util.keystr(path)}"
          ", a variable that is not a weight (a mask, a scale): a soup "
          "averages weights only")


def _as_soup(first, model) -> restore.Restored:
  """`first` with `model` in its place and no methods: the soup's model
  already has them applied (exporting it must not fold LoRA twice)."""
  config = first.config.copy_and_resolve_references()
  with config.unlocked():
    config.methods = ()
    config.method_options = {}
  bare = dataclasses.replace(
      first, config=config, methods=[],
      frozen=first.frozen._replace(methods={}),
      context=dataclasses.replace(first.context, config=config))
  return bare.with_model(model)


def uniform_soup(runs) -> restore.Restored:
  """Every run's weights averaged (see the module docstring)."""
  ingredients = runs if isinstance(runs, Ingredients) else Ingredients(runs)
  return ingredients.soup(range(len(ingredients.runs)))


@dataclasses.dataclass
class GreedySoup:
  """`greedy_soup`'s result.

  Attributes:
    members: the chosen runs, in the order they joined.
    soup: their averaged model.
    score: its held-out score.
    trials: (workdir, its own score, score of the soup with it, joined)
      per run, in the order tried (the first: the best run, always joined).
  """
  members: list
  soup: restore.Restored
  score: float
  trials: list


def greedy_soup(runs, score_fn: Callable[[restore.Restored], float],
                mode: str = "max") -> GreedySoup:
  """Wortsman et al.'s greedy soup.

  Args:
    runs: `Restored` runs (or `Ingredients`).
    score_fn: a held-out score of a model (a `Restored`); each run is scored
      alone (as a soup of one), then each candidate soup.
    mode: "max" (higher is better) or "min" (config.eval_metric_mode).

  Returns:
    A `GreedySoup`: a run joins only if the soup's score does not drop.
  """
  if mode not in ("max", "min"):
    raise ValueError(f"mode={mode!r}; valid: max, min")
  sign = 1.0 if mode == "max" else -1.0
  ingredients = runs if isinstance(runs, Ingredients) else Ingredients(runs)
  alone = [float(score_fn(ingredients.soup([i])))
           for i in range(len(ingredients.runs))]
  # Best first; ties keep the given order (a stable sort).
  order = sorted(range(len(alone)), key=lambda i: -sign * alone[i])
  chosen = [order[0]]
  soup, best = ingredients.soup(chosen), alone[order[0]]
  trials = [(ingredients.runs[order[0]].workdir, best, best, True)]
  for i in order[1:]:
    candidate = ingredients.soup(chosen + [i])
    score = float(score_fn(candidate))
    joined = sign * score >= sign * best
    if joined:
      chosen.append(i)
      soup, best = candidate, score
    trials.append((ingredients.runs[i].workdir, alone[i], score, joined))
  return GreedySoup([ingredients.runs[i] for i in chosen], soup, best, trials)


# --- Logit ensembles ----------------------------------------------------------


class _Outputs(sequence.Evaluator):
  """The sequence evaluator's per-example outputs with their labels."""

  def collect(self, params, frozen) -> dict:
    return self._collect(params, frozen)[0]


def _sequence_level(r):
  from research import evaluators  # pylint: disable=import-outside-toplevel
  for name, ecfg in evaluators.configs(r.config, r.task).items():
    cls = evaluators.module(ecfg["type"], name).Evaluator
    if not issubclass(cls, sequence.Evaluator):
      raise ValueError(
          f"{r.workdir}: task {r.config.task!r} evaluates with "
          f"{cls.__module__}, not one output row per example: logits of "
          "such a task are not averaged here")


def metric_names(r) -> tuple:
  """The run's metrics (config.metrics), as its sequence evaluator has them."""
  return sequence.Evaluator.metric_names(r.config, {})


def outputs(r, split, batch_size: int = 64) -> dict:
  """One run's per-example logits, predictions, labels and weights on
  `split`, and its metrics (`research.metrics.common`)."""
  _sequence_level(r)
  evaluator = r.make_evaluator(split, batch_size, tuple(r.config.data.buckets),
                               cls=_Outputs, logits=True)
  out = evaluator.collect(r.params, r.frozen)
  out["metrics"] = _metrics(r, out["predictions"], out)
  return out


def _metrics(r, predictions, out) -> dict:
  if "labels" not in out:
    return {}
  labels, weights = out["labels"], out["weights"]
  weights = np.broadcast_to(
      weights.reshape(weights.shape + (1,) * (labels.ndim - weights.ndim)),
      labels.shape)
  return metrics_lib.compute(metric_names(r), np.asarray(predictions), labels,
                             weights)


def ensemble_logits(runs, split, batch_size: int = 64) -> dict:
  """The mean of the members' logits on `split`, and its metrics.

  Returns:
    {"logits": [n, C] mean, "predictions": the task's prediction of them,
     "metrics": {name: value}, "members": each member's `outputs`}.
  """
  check_compatible(runs, soup=False)
  members = [outputs(r, split, batch_size) for r in runs]
  logits = mean_outputs([m["logits"] for m in members])
  predictions = np.asarray(runs[0].task.predict(logits, None))
  return {"logits": logits, "predictions": predictions,
          "metrics": _metrics(runs[0], predictions, members[0]),
          "members": members}


# --- Ensemble directories -----------------------------------------------------


def write_ensemble(out_dir: str, runs, *, copy: bool = True,
                   note: str = "") -> str:
  """An ensemble directory `research.serve` serves: `ensemble.json`.

  Args:
    out_dir: a new directory (one holding an ensemble.json is refused).
    runs: the members (`Restored`).
    copy: write each member as a model-registry version inside `out_dir`
      (immutable: a workdir may be trained on); False lists the workdirs.
    note: free text kept in ensemble.json.
  """
  from research.continual import registry as registry_lib  # pylint: disable=import-outside-toplevel
  check_compatible(runs, soup=False)
  path = os.path.join(out_dir, ENSEMBLE_FILE)
  if os.path.exists(path):
    raise ValueError(f"{path} exists; give another directory")
  os.makedirs(out_dir, exist_ok=True)
  members = []
  if copy:
    registry = registry_lib.Registry(out_dir)
    for r in runs:
      version = registry.add(r, kind="ensemble member", source=r.workdir,
                             note=f"{r.workdir} ({r.which}, step {r.step})")
      members.append({"path": os.path.join(registry_lib.VERSIONS, version),
                      "which": "best", "source": os.path.abspath(r.workdir)})
  else:
    members = [{"path": os.path.abspath(r.workdir), "which": r.which}
               for r in runs]
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"members": members, "task": runs[0].config.task,
               "label_names": list(runs[0].label_names), "note": note}, f,
              indent=2)
  os.replace(tmp, path)
  return out_dir


def is_ensemble(path: str) -> bool:
  return os.path.exists(os.path.join(path, ENSEMBLE_FILE))


def read_ensemble(path: str, tokenizer=None) -> list:
  """The members of an ensemble directory, restored and checked.

  Raises:
    FileNotFoundError: no ensemble.json, or a member that is missing.
    ValueError: a malformed ensemble.json, or members that disagree.
  """
  file = os.path.join(path, ENSEMBLE_FILE)
  if not os.path.exists(file):
    raise FileNotFoundError(f"{file}: not found; is {path} an ensemble "
                            "directory (research.soup --ensemble_out)?")
  with open(file, encoding="utf-8") as f:
    spec = json.load(f)
  members = spec.get("members") if isinstance(spec, dict) else None
  if not members or not isinstance(members, list):
    raise ValueError(f"{file}: expected {{\"members\": [{{\"path\": ..., "
                     "\"which\": \"best\"}, ...]}} with at least one member")
  runs = []
  for i, m in enumerate(members):
    m = {"path": m} if isinstance(m, str) else m
    if not isinstance(m, dict) or not isinstance(m.get("path"), str):
      raise ValueError(f"{file}: members[{i}] = {m!r}: expected a path or "
                       "{\"path\": ..., \"which\": \"best\" | \"latest\"}")
    member = os.path.join(path, m["path"])  # an absolute path stays as is
    runs.append(restore.restore_run(member, m.get("which", "best"),
                                    tokenizer=tokenizer))
  check_compatible(runs, soup=False)
  return runs


# --- The table ----------------------------------------------------------------


def compare(runs, select_split, eval_split, batch_size: int = 64) -> dict:
  """Every row of the soup table (best single, mean ± std single, logit
  ensemble, uniform soup, greedy soup) on `eval_split`; the greedy soup
  chosen on `select_split`. Metric: the first run's config.eval_metric."""
  first = runs[0]
  metric = first.config.eval_metric.rpartition("/")[2]
  mode = first.config.get("eval_metric_mode", "max")
  for r in runs:
    _sequence_level(r)
  if metric not in metric_names(first):
    raise ValueError(f"{first.workdir}: config.eval_metric={metric!r} is not "
                     f"in config.metrics {metric_names(first)}")
  ingredients = Ingredients(runs)
  template = ingredients.template
  buckets = tuple(first.config.data.buckets)
  select_eval = template.make_evaluator(select_split, batch_size, buckets,
                                        cls=sequence.Evaluator)
  report_eval = template.make_evaluator(eval_split, batch_size, buckets,
                                        cls=sequence.Evaluator)
  score = lambda ev, r: float(ev.run(r.params, r.frozen)[metric])  # pylint: disable=unnecessary-lambda-assignment
  ensemble = ensemble_logits(runs, eval_split, batch_size)
  single = [m["metrics"][metric] for m in ensemble["members"]]
  uniform = ingredients.soup(range(len(runs)))
  greedy = greedy_soup(ingredients, lambda r: score(select_eval, r), mode)
  best = (max if mode == "max" else min)(range(len(runs)),
                                         key=lambda i: single[i])
  return {
      "metric": metric, "mode": mode, "n": len(eval_split),
      "runs": [r.workdir for r in runs], "single": single,
      "best_single": (runs[best].workdir, single[best]),
      "ensemble": ensemble["metrics"][metric],
      "uniform": score(report_eval, uniform),
      "greedy": score(report_eval, greedy.soup),
      "greedy_members": [r.workdir for r in greedy.members],
      "greedy_trials": greedy.trials,
      "soups": {"uniform": uniform, "greedy": greedy.soup},
  }


def format_table(result: dict, names=None) -> str:
  """`compare`'s result as a markdown table; `names` shortens workdirs."""
  name = names or (lambda w: os.path.basename(os.path.normpath(w)))
  single = np.asarray(result["single"])
  std = float(np.std(single, ddof=1)) if len(single) > 1 else 0.0
  m = result["metric"]
  rows = [
      ("best single", f"{result['best_single'][1]:.4f}",
       name(result["best_single"][0])),
      (f"mean ± std single ({len(single)} runs)",
       f"{single.mean():.4f} ± {std:.4f}",
       ", ".join(f"{s:.4f}" for s in single)),
      (f"logit ensemble ({len(single)})", f"{result['ensemble']:.4f}",
       "mean of the members' logits"),
      (f"uniform soup ({len(single)})", f"{result['uniform']:.4f}",
       "mean of every run's weights"),
      (f"greedy soup ({len(result['greedy_members'])})",
       f"{result['greedy']:.4f}",
       "members: " + ", ".join(name(w) for w in result["greedy_members"])),
  ]
  lines = [f"| model | {m} ({result['n']} examples) | |", "|---|---|---|"]
  lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
  return "\n".join(lines)


def main():
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_list("runs", [], "The runs' workdirs (or registry versions).")
  flags.DEFINE_enum("which", "best", ["best", "latest"], "Which checkpoint.")
  flags.DEFINE_string("select_file", None, "Held-out TSV/CSV/JSON lines (the "
                      "runs' columns) the greedy soup is chosen on.")
  flags.DEFINE_string("eval_file", None, "The file the table reports on.")
  flags.DEFINE_string("out", "", "A model registry to write the uniform and "
                      "greedy soups into (two servable versions).")
  flags.DEFINE_string("ensemble_out", "", "An ensemble directory to write "
                      "(research.serve serves it).")
  flags.DEFINE_integer("batch_size", 64, "Evaluation batch size.")
  flags.mark_flags_as_required(["select_file", "eval_file"])

  def run(argv):
    del argv
    f = flags.FLAGS
    from research.data import splits as splits_lib  # pylint: disable=import-outside-toplevel
    from research.continual import registry as registry_lib  # pylint: disable=import-outside-toplevel
    try:
      runs = load_runs(f.runs, f.which)
      first = runs[0]
      splits = [splits_lib.load_file(
          first.config, first.tokenizer, first.task, path, name,
          first.label_names, where=flag)
          for path, name, flag in ((f.select_file, "select", "--select_file"),
                                   (f.eval_file, "eval", "--eval_file"))]
      result = compare(runs, *splits, batch_size=f.batch_size)
      print(f"metric: {result['metric']} (config.eval_metric) on "
            f"{f.eval_file}; greedy soup chosen on {f.select_file}")
      print(format_table(result))
      if f.out:
        registry = registry_lib.Registry(f.out)
        for kind in ("uniform", "greedy"):
          members = (result["runs"] if kind == "uniform"
                     else result["greedy_members"])
          v = registry.add(result["soups"][kind], kind="soup",
                           metrics={f"eval/{result['metric']}": result[kind]},
                           note=f"{kind} soup of {', '.join(members)}")
          print(f"{kind} soup: {registry.path(v)}")
      if f.ensemble_out:
        write_ensemble(f.ensemble_out, runs,
                       note=f"logit ensemble of {', '.join(result['runs'])}")
        print(f"ensemble: {f.ensemble_out}")
    except (FileNotFoundError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  app.run(run)


if __name__ == "__main__":
  main()

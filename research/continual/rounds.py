"""Continual fine-tuning in rounds: feedback in, a gated new version out.

    python -m research.continual --config experiments/continual_reviews.py \
        --workdir /tmp/stream

Each round (config.continual; research/configs/default.py):

1. takes the next `round_size` corrections from the feedback store
   (`research.serve`'s, any SQLAlchemy URL; `Task.feedback_row` turns a
   request and its label into a training row) or from a file, and draws
   `replay_ratio` times as many earlier examples from the reservoir
   (`replay.Reservoir`: the base run's training data, then every promoted
   round's examples). The round's data and its manifest (feedback ids,
   where it starts) are written once, atomically, before it trains;
2. fine-tunes the registry's current version on them with `research.train`
   and this config (its methods: none, `ewc` or `l2_sp` towards the start,
   `lora` for a new adapter per round, folded into the version on export),
   scoring the old and the new held-out files;
3. registers the result as a version (`registry.Registry.add`), scores it
   against the current one through the gate (`gate.decide`; optionally a
   shadow replay of logged requests), promotes it or not, and records
   the round in <workdir>/state.json in one atomic write.

A killed round resumes where it was: its data comes from its manifest (the
same feedback, never the next), its training resumes from its checkpoint,
and a version it already registered is found again (`Registry.find`). The
stream's position advances only in the state write that ends a round, so no
feedback is trained on twice and none is skipped.

A method option containing "{replay}" is given the round's replay buffer
file (every reservoir example at the round's start), e.g. EWC's
`fisher_file="{replay}"`: the Fisher information of the earlier data.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import ml_collections

from research import data, restore, train
from research.configs import ConfigError
from research.continual import gate, metrics
from research.continual.registry import Registry, write_json
from research.continual.replay import Reservoir
from research.data import sources

log = logging.getLogger("research.continual")

STATE = "state.json"
PROMOTE = ("gate", "always", "never")
REPLAY = "{replay}"


def _read_json(path):
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


def check(config) -> None:
  """ConfigError naming the config.continual field at fault."""
  c = config.continual
  where = "config.continual"
  if not c.registry:
    raise ConfigError(f"{where}.registry is empty: the model registry's "
                      "directory (created if new)")
  for field in ("old_eval_file", "new_eval_file"):
    if not c[field]:
      raise ConfigError(f"{where}.{field} is empty: every version is scored "
                        "on the old and the new held-out files")
    if not os.path.isfile(c[field]):
      raise ConfigError(f"{where}.{field}={c[field]!r}: no such file")
  if bool(c.feedback_db) == bool(c.feedback_file):
    raise ConfigError(f"{where}: set exactly one of feedback_db (a "
                      "SQLAlchemy URL) and feedback_file (a labelled file)")
  if c.feedback_file and not os.path.isfile(c.feedback_file):
    raise ConfigError(f"{where}.feedback_file={c.feedback_file!r}: no such "
                      "file")
  if c.promote not in PROMOTE:
    raise ConfigError(f"{where}.promote={c.promote!r}; valid: "
                      f"{', '.join(PROMOTE)}")
  for field, low in (("rounds", 1), ("round_size", 1),
                     ("replay_capacity", 1), ("shadow_requests", 0)):
    if c[field] < low:
      raise ConfigError(f"{where}.{field}={c[field]} must be >= {low}")
  if c.replay_ratio < 0:
    raise ConfigError(f"{where}.replay_ratio={c.replay_ratio} must be >= 0")
  if c.shadow_requests and not c.feedback_db:
    raise ConfigError(f"{where}.shadow_requests={c.shadow_requests} replays "
                      "logged requests: it needs feedback_db")


def _read_rows(config, path) -> list[dict]:
  """A labelled file's rows as {column: value} in config.data's columns
  (a bad row: DataError naming the file and line)."""
  d = config.data
  raw = sources.LocalFile(path, d.format).read(
      tuple(d.text_fields), d.label_field, d.bad_rows, True)
  return [{**{f: raw.texts[i][k] for i, f in enumerate(d.text_fields)},
           d.label_field: raw.labels[k]} for k in range(len(raw.rows))]


class Stream:
  """One continual-learning stream in `workdir` (see the module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    check(config)
    self.config = config
    self.c = config.continual
    self.workdir = os.path.abspath(workdir)
    self.registry = Registry(self.c.registry)
    self.files = {"old": self.c.old_eval_file, "new": self.c.new_eval_file}
    os.makedirs(self.workdir, exist_ok=True)

  # --- The stream's state -------------------------------------------------------

  def state(self) -> dict:
    """The saved state, or the first one (the base registered and scored,
    the reservoir seeded with the base run's training data)."""
    state = _read_json(os.path.join(self.workdir, STATE))
    if state is not None:
      return state
    current = self.registry.current()
    if current is None:
      if not self.c.base:
        raise ConfigError(
            f"config.continual.registry={self.c.registry!r} has no current "
            "version: set config.continual.base to the research.train "
            "workdir to start from")
      current = self.registry.find(self.c.base) or self.registry.add(
          restore.restore_run(self.c.base), kind="base", source=self.c.base,
          metrics=gate.evaluate(self.c.base, self.files))
      self.registry.promote(current, "the base of a continual stream")
    reservoir = Reservoir(self.c.replay_capacity, seed=self.config.seed)
    if self.c.replay_ratio > 0 or self._uses_replay_file():
      reservoir.add(self._replay_seed(current))
    state = {"round": 0, "after": 0, "base": current, "current": current,
             "reservoir": reservoir.state(), "rounds": []}
    write_json(os.path.join(self.workdir, STATE), state)
    return state

  def _uses_replay_file(self) -> bool:
    """A method option names the round's replay file (EWC's Fisher data)."""
    return any(isinstance(v, str) and REPLAY in v
               for options in self.config.method_options.values()
               for v in options.values())

  def _replay_seed(self, version) -> list[dict]:
    path = self.c.replay_file
    if not path:
      source = self.registry.metadata(version).get("source")
      path = restore.read_config(source).data.train_file if source else ""
    if not path or not os.path.isfile(path):
      raise ConfigError(
          f"config.continual.replay_ratio={self.c.replay_ratio} (or a method "
          f"option with {REPLAY}) needs earlier examples: set "
          "config.continual.replay_file (the base run's training data, a "
          f"local file; found {path!r})")
    return _read_rows(self.config, path)

  # --- A round's data -------------------------------------------------------------

  def _new_examples(self, after, label_names):
    """(rows, ids, skipped, next position) of the next round, or None when
    fewer than round_size are there yet."""
    size = self.c.round_size
    if self.c.feedback_file:
      rows = _read_rows(self.config, self.c.feedback_file)[after:after + size]
      if len(rows) < size:
        return None
      return rows, list(range(after + 1, after + size + 1)), [], after + size
    from research import tasks  # pylint: disable=import-outside-toplevel
    from research.serve.store import FeedbackStore  # pylint: disable=import-outside-toplevel
    with FeedbackStore.open(self.c.feedback_db) as store:
      feedback = store.corrections_since(after, size)
    if len(feedback) < size:
      return None
    task = tasks.load(self.config, None)
    rows, ids, skipped = [], [], []
    for fb in feedback:
      try:
        row = task.feedback_row(fb.request, fb.label)
        if label_names and row[self.config.data.label_field] not in label_names:
          raise ValueError(f"label {fb.label!r} is not one of the model's "
                           f"{list(label_names)}")
      except ValueError as e:
        skipped.append({"feedback_id": fb.id, "reason": str(e)})
        continue
      rows.append(row)
      ids.append(fb.id)
    return rows, ids, skipped, feedback[-1].id

  def round_data(self, r, state) -> dict | None:
    """The manifest of round `r`'s data, written once (atomically)."""
    folder = os.path.join(self.workdir, "rounds", f"r{r:03d}", "data")
    manifest = _read_json(os.path.join(folder, "manifest.json"))
    if manifest is not None:
      return manifest
    start = state["current"]
    labels = tuple(data.load_label_names(
        os.path.join(self.registry.path(start), "labels.json")))
    found = self._new_examples(state["after"], labels)
    if found is None:
      return None
    rows, ids, skipped, after = found
    reservoir = Reservoir(self.c.replay_capacity, state=state["reservoir"])
    replay = reservoir.sample(round(self.c.replay_ratio * len(rows)),
                              seed=(self.config.seed, r))
    tmp = f"{folder}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _write_jsonl(os.path.join(tmp, "new.jsonl"), rows)
    _write_jsonl(os.path.join(tmp, "train.jsonl"), rows + replay)
    _write_jsonl(os.path.join(tmp, "replay.jsonl"), reservoir.items)
    manifest = {"round": r, "start": start, "after": state["after"],
                "next": after, "ids": ids, "skipped": skipped,
                "new": len(rows), "replayed": len(replay),
                "train_file": os.path.join(folder, "train.jsonl"),
                "new_file": os.path.join(folder, "new.jsonl"),
                "replay_file": os.path.join(folder, "replay.jsonl")}
    write_json(os.path.join(tmp, "manifest.json"), manifest)
    os.replace(tmp, folder)
    return manifest

  def round_config(self, manifest, labels) -> ml_collections.ConfigDict:
    """This config, training the round's start version on the round's data."""
    config = self.config.copy_and_resolve_references()
    with config.unlocked():
      config.model.name = os.path.join(
          self.registry.path(manifest["start"]), "model")
      config.data.source = "local"
      config.data.format = "auto"
      config.data.train_file = manifest["train_file"]
      config.data.eval_file = ",".join(f"{k}={v}"
                                       for k, v in self.files.items())
      config.data.label_names = tuple(labels)
      config.evals = ml_collections.ConfigDict()
      for options in config.method_options.values():
        for key, value in options.items():
          if isinstance(value, str) and REPLAY in value:
            options[key] = value.replace(REPLAY, manifest["replay_file"])
    return config

  # --- Rounds ----------------------------------------------------------------

  def run(self) -> dict:
    """Runs rounds until config.continual.rounds are done (or the feedback
    runs out); returns the state."""
    state = self.state()
    while state["round"] < self.c.rounds:
      after = self.run_round(state)
      if after is None:
        log.warning("round %d waits: fewer than %d new examples after %s",
                    state["round"] + 1, self.c.round_size, state["after"])
        break
      state = after
    return state

  def run_round(self, state) -> dict | None:
    """The next round; its state, or None when its feedback is not there."""
    r = state["round"] + 1
    manifest = self.round_data(r, state)
    return None if manifest is None else self._train_round(r, manifest,
                                                           state)

  def _train_round(self, r, manifest, state) -> dict:
    start = manifest["start"]
    labels = data.load_label_names(
        os.path.join(self.registry.path(start), "labels.json"))
    run_dir = os.path.join(self.workdir, "rounds", f"r{r:03d}", "run")
    summary = train.train_and_evaluate(self.round_config(manifest, labels),
                                       run_dir)
    scores = {k[len("eval/"):]: float(v) for k, v in summary.items()
              if k.startswith("eval/") and isinstance(v, (int, float))}
    start_scores = self.registry.metadata(start)["metrics"]
    kept = {k: v for k, v in manifest.items()
            if k in ("after", "next", "new", "replayed")}
    candidate = self.registry.find(run_dir) or self.registry.add(
        restore.restore_run(run_dir, "latest"), kind="round", parent=start,
        source=run_dir, metrics=scores,
        data={**kept, "feedback_ids": [manifest["ids"][0], manifest["ids"][-1]]
              if manifest["ids"] else []})
    decision = gate.decide(scores, start_scores,
                           metric=self.config.eval_metric,
                           margin=self.c.margin,
                           max_forgetting=self.c.max_forgetting,
                           mode=self.config.eval_metric_mode)
    shadow = None
    if self.c.shadow_requests:
      from research.serve.store import FeedbackStore  # pylint: disable=import-outside-toplevel
      with FeedbackStore.open(self.c.feedback_db) as store:
        shadow = gate.shadow(store, self.registry.path(start),
                             self.registry.path(candidate),
                             self.c.shadow_requests)
    promoted = self.c.promote == "always" or (self.c.promote == "gate"
                                              and decision.promote)
    reservoir = Reservoir(self.c.replay_capacity, state=state["reservoir"])
    if promoted:
      self.registry.promote(candidate, f"round {r}: " + "; ".join(
          decision.reasons))
      with open(manifest["new_file"], encoding="utf-8") as f:
        reservoir.add([json.loads(line) for line in f])
    record = {"round": r, "start": start, "candidate": candidate,
              "promoted": promoted, "scores": scores,
              "gate": {"promote": decision.promote, "gain": decision.gain,
                       "forgetting": decision.forgetting,
                       "reasons": decision.reasons},
              "shadow": shadow, "data": {**kept, "skipped":
                                         len(manifest["skipped"])}}
    log.info("round %d: %s %s (%s)", r, candidate,
             "promoted" if promoted else "not promoted",
             "; ".join(decision.reasons))
    state = {**state, "round": r, "after": manifest["next"],
             "current": self.registry.current(),
             "reservoir": reservoir.state(),
             "rounds": state["rounds"] + [record]}
    write_json(os.path.join(self.workdir, STATE), state)
    return state


def table_row(state, registry: Registry, metric: str) -> dict:
  """Scores after each round and what they add up to, for a stream whose
  rounds each built on the last (promote="always").

  Returns:
    {"old": [...], "new": [...]} per round (round 0: the base), and
    forgetting (old), bwt (old: learned at round 0), gain (new), and
    worst_drop: the largest fall of the old score below the base's over
    the rounds (forgetting at the final round misses a dip that later
    rounds recovered from); gate_passed: the rounds the gate would have
    promoted.
  """
  base = registry.metadata(state["base"])["metrics"]
  rows = [base] + [rec["scores"] for rec in state["rounds"]]
  scores = [[row[f"old/{metric}"], row[f"new/{metric}"]] for row in rows]
  return {"old": [s[0] for s in scores], "new": [s[1] for s in scores],
          "forgetting": metrics.forgetting(scores, 0),
          "bwt": metrics.backward_transfer(scores, {0: 0}),
          "gain": metrics.gain(scores, 1),
          "worst_drop": max(0.0, max(scores[0][0] - s[0] for s in scores)),
          "gate_passed": sum(rec["gate"]["promote"] for rec in state["rounds"])}

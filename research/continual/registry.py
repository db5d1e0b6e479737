"""A model registry: numbered, immutable versions, one of them current.

    registry = Registry("/models/reviews")
    v = registry.add(restore.restore_run(workdir, "latest"), kind="round",
                     parent=registry.current(), metrics={...}, data={...})
    registry.promote(v, "gate: +0.031 new/accuracy, forgot 0.004")
    registry.rollback("bad answers in production")   # the previous current
    python -m research.continual rollback --registry /models/reviews

Layout:

    <root>/versions/v0001/   model/ (a research.export directory: Hugging
                             Face or sentence-transformers, every method
                             folded in), adapter/ (a LoRA round's own
                             adapter, a PEFT directory), config.json (the run's config with
                             model.name = that model/ and no methods),
                             labels.json, version.json (metadata)
    <root>/current           a symlink to the current version's directory
    <root>/history.jsonl     every promotion and rollback, in order

A version is a `research.restore` directory (`restore_run` reads it without
a checkpoint), so `research.serve --workdir <root>/current` serves the
current model, `research.export` re-exports it and a continual round starts
from `<version>/model`. Versions are written under a temporary name and
renamed when complete; `current` is replaced atomically (a new symlink
renamed over the old), so a killed process leaves the registry as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

from research import restore

VERSIONS = "versions"
CURRENT = "current"
HISTORY = "history.jsonl"


class RegistryError(ValueError):
  """A version that does not exist, or a rollback with nothing before it."""


def write_json(path, value):
  """Writes JSON atomically: a temporary file, fsynced, renamed over `path`
  (a killed process leaves the old file or the new one, never half)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, default=float)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class Registry:
  """Versions under `root` (see the module docstring)."""

  def __init__(self, root: str):
    self.root = os.path.abspath(root)
    os.makedirs(os.path.join(self.root, VERSIONS), exist_ok=True)

  # --- Reading ----------------------------------------------------------------

  def path(self, version: str) -> str:
    """A version's directory (RegistryError naming the known ones)."""
    path = os.path.join(self.root, VERSIONS, version)
    if not os.path.exists(os.path.join(path, restore.VERSION_FILE)):
      raise RegistryError(f"{self.root}: no version {version!r}; versions: "
                          f"{', '.join(self.versions()) or 'none'}")
    return path

  def versions(self) -> list[str]:
    """Complete versions, oldest first."""
    base = os.path.join(self.root, VERSIONS)
    return sorted(v for v in os.listdir(base) if v.startswith("v")
                  and os.path.exists(os.path.join(base, v,
                                                  restore.VERSION_FILE)))

  def metadata(self, version: str) -> dict:
    """The version's version.json."""
    return restore.read_version(self.path(version))

  def current(self) -> str | None:
    """The current version's name, or None before the first promotion."""
    link = os.path.join(self.root, CURRENT)
    return os.path.basename(os.readlink(link)) if os.path.islink(link) \
        else None

  def history(self) -> list[dict]:
    """Promotions and rollbacks, oldest first."""
    path = os.path.join(self.root, HISTORY)
    if not os.path.exists(path):
      return []
    with open(path, encoding="utf-8") as f:
      return [json.loads(line) for line in f if line.strip()]

  def find(self, source: str) -> str | None:
    """The version made from `source` (a run workdir), if any: a restarted
    round finds the version it already wrote."""
    source = os.path.abspath(source)
    for v in self.versions():
      if self.metadata(v).get("source") == source:
        return v
    return None

  # --- Writing ----------------------------------------------------------------

  def add(self, restored: restore.Restored, *, kind: str, parent=None,
          source: str | None = None, metrics=None, data=None,
          note: str = "") -> str:
    """Writes `restored`'s model as the next version; returns its name.

    Args:
      restored: a run (`restore.restore_run`) or a model put in its place
        (`Restored.with_model`: a soup).
      kind: what made it: "base", "round", "soup", ...
      parent: the version it was trained from, or None.
      source: the run directory it came from (`find`), or None.
      metrics: held-out metrics to keep with it ({"old/accuracy": ...}).
      data: what it was trained on (a round's manifest).
      note: free text.
    """
    from research import export  # pylint: disable=import-outside-toplevel
    existing = self.versions()
    number = int(existing[-1][1:]) + 1 if existing else 1
    name = f"v{number:04d}"
    final = os.path.join(self.root, VERSIONS, name)
    tmp = os.path.join(self.root, VERSIONS, f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed earlier attempt
    os.makedirs(tmp)
    export.export_restored(restored, os.path.join(tmp, "model"))
    adapter = None
    if any(m.export_adapters is not None for m in restored.methods):
      # A round's own adapter too (a new LoRA per round), as a PEFT
      # directory: what this version added to its parent. Not every model
      # has a PEFT form (a mean-pooled one: PEFT loads onto BertFor*, which
      # pools with the pooler); the merged model above is the version.
      try:
        export.export_restored(restored, os.path.join(tmp, "adapter"),
                               peft_dir=True)
        adapter = "adapter"
      except ValueError as e:
        adapter = f"not written: {e}"
    config = restored.config.copy_and_resolve_references()
    with config.unlocked():
      config.model.name = os.path.join(final, "model")
      config.methods = ()
      config.method_options = {}
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
    write_json(os.path.join(tmp, "labels.json"),
                list(restored.label_names))
    write_json(os.path.join(tmp, restore.VERSION_FILE), {
        "version": name, "kind": kind, "parent": parent,
        "created": time.time(), "step": restored.step,
        "source": os.path.abspath(source) if source else None,
        "methods": list(restored.config.get("methods", ())),
        "metrics": dict(metrics or {}), "data": data, "note": note,
        "adapter": adapter})
    os.replace(tmp, final)
    return name

  def promote(self, version: str, reason: str = "") -> None:
    """Makes `version` current (atomically) and records why; nothing when
    it already is (a restarted round promotes again)."""
    if self.current() == version:
      return
    self._set_current(version, {"event": "promote", "version": version,
                                "previous": self.current(),
                                "reason": reason})

  def rollback(self, reason: str = "") -> str:
    """Makes the version current before the current one again; returns it.

    Raises:
      RegistryError: nothing was current before it.
    """
    now = self.current()
    chain = []  # the current versions in order, rollbacks undone
    for event in self.history():
      if event["event"] == "promote":
        chain.append(event["version"])
      elif chain:
        chain.pop()
    if now is None or len(chain) < 2:
      raise RegistryError(f"{self.root}: nothing to roll back to (current: "
                          f"{now}; history: {len(self.history())} events)")
    target = chain[-2]
    self._set_current(target, {"event": "rollback", "version": target,
                               "previous": now, "reason": reason})
    return target

  def _set_current(self, version, event):
    target = os.path.relpath(self.path(version), self.root)
    link = os.path.join(self.root, CURRENT)
    tmp = f"{link}.tmp"
    if os.path.lexists(tmp):
      os.remove(tmp)
    os.symlink(target, tmp)
    with open(os.path.join(self.root, HISTORY), "a", encoding="utf-8") as f:
      f.write(json.dumps({**event, "time": time.time()}) + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, link)


def main(argv=None) -> int:
  """`python -m research.continual.registry list|promote|rollback|shadow`."""
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(
      prog="python -m research.continual.registry",
      description="A model registry's versions, promotion and rollback.")
  sub = parser.add_subparsers(dest="command", required=True)
  for name, text in (("list", "versions, their scores, the current one"),
                     ("promote", "make a version current"),
                     ("rollback", "make the previous current version "
                                  "current again"),
                     ("shadow", "replay logged requests through the current "
                                "version and another; print their agreement")):
    cmd = sub.add_parser(name, help=text)
    cmd.add_argument("root", help="the registry directory")
    if name in ("promote", "shadow"):
      cmd.add_argument("version", help="e.g. v0003")
    if name in ("promote", "rollback"):
      cmd.add_argument("--reason", default="", help="recorded in history")
    if name == "shadow":
      cmd.add_argument("--feedback_db", required=True,
                       help="the served model's feedback store URL")
      cmd.add_argument("--limit", type=int, default=500)
  args = parser.parse_args(argv)
  registry = Registry(args.root)
  try:
    if args.command == "list":
      now = registry.current()
      for v in registry.versions():
        meta = registry.metadata(v)
        scores = " ".join(f"{k}={x:.4f}" for k, x in meta["metrics"].items()
                          if isinstance(x, float) and "loss" not in k)
        print(f"{'*' if v == now else ' '} {v} {meta['kind']:<6} parent="
              f"{meta['parent']} {scores}")
    elif args.command == "promote":
      registry.promote(args.version, args.reason or "by hand")
      print(f"current: {registry.current()}")
    elif args.command == "rollback":
      print(f"current: {registry.rollback(args.reason or 'by hand')}")
    else:
      from research.continual import gate  # pylint: disable=import-outside-toplevel
      from research.serve.store import FeedbackStore  # pylint: disable=import-outside-toplevel
      now = registry.current()
      if now is None:
        raise RegistryError(f"{registry.root}: no current version")
      with FeedbackStore.open(args.feedback_db) as store:
        out = gate.shadow(store, registry.path(now),
                          registry.path(args.version), args.limit)
      print(json.dumps(out, indent=1, ensure_ascii=False))
  except RegistryError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

"""Plug-ins by naming convention, and the checks of their own config options.

Tasks, methods, evaluators and samplers are modules found by name, as
big_vision finds `evaluators.<type>`: `config.task = "masked_lm"` is
`research/tasks/masked_lm.py`. A name with a dot is a full module path, so a
component defined anywhere (a test file, a project folder) plugs in with no
edit to `research/`: `config.task = "tests.test_core_plugins"`.

Each component owns its options: a module-level `CONFIG` dict of defaults,
checked here with the same nearest-name messages as `research/configs`.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil

import ml_collections


class ConfigError(ValueError):
  """A config field with a wrong name, type or value."""


def check_overrides(cls, base, methods, field, name):
  """ConfigError unless plug-in class `cls` defines each of `methods`.

  The base classes only declare them (they raise NotImplementedError); a
  plug-in missing one would otherwise fail deep inside the first step or
  evaluation instead of before anything loads.
  """
  missing = [m for m in methods if getattr(cls, m, None) is getattr(base, m)]
  if missing:
    raise ConfigError(
        f"{field}={name!r}: {cls.__module__}.{cls.__name__} does not define "
        f"{', '.join(missing)} (see {base.__module__}.{base.__name__})")


def available(package: str) -> list[str]:
  """The plug-in modules of a package (`research.tasks`): public, sorted."""
  pkg = importlib.import_module(package)
  return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                # A subpackage holds a family's support code (methods/peft/).
                if not m.ispkg and not m.name.startswith("_")
                and m.name != "common")


def module(package: str, name: str, field: str, attribute: str):
  """Imports the plug-in `name` of `package` (or the module path `name`).

  Args:
    package: e.g. "research.tasks".
    name: a module of the package ("masked_lm") or a dotted module path.
    field: the config field, for messages ("config.task").
    attribute: what the module must define ("Task").

  Returns:
    The module.

  Raises:
    ConfigError: no such module, or it lacks `attribute`; lists the valid
      names and the nearest one.
  """
  if not isinstance(name, str) or not name:
    raise ConfigError(f"{field}={name!r}: expected a module name")
  path = name if "." in name else f"{package}.{name}"
  try:
    mod = importlib.import_module(path)
  except ModuleNotFoundError as e:
    # Only the module itself missing is a config mistake; an import failing
    # inside it is a bug with its own traceback.
    if e.name is None or not (path == e.name or path.startswith(e.name + ".")):
      raise
    valid = available(package)
    near = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise ConfigError(
        f"{field}={name!r} is not a module of {package.replace('.', '/')}/"
        f"{hint} (valid: {', '.join(valid)}; a dotted name is a full module "
        "path)") from None
  if not hasattr(mod, attribute):
    raise ConfigError(f"{field}={name!r}: module {path} defines no "
                      f"{attribute}")
  return mod


def type_ok(value, default) -> bool:
  """Whether `value` may replace `default` (ints for floats, lists for tuples)."""
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  if isinstance(default, ml_collections.ConfigDict):  # an empty sub-dict
    return isinstance(value, (ml_collections.ConfigDict, dict))
  if default is None:
    return True
  return isinstance(value, type(default))


def options(given, defaults: dict, field: str, owner: str) -> dict:
  """A component's options: `defaults` updated by `given`, checked.

  Args:
    given: the configured options (a ConfigDict, dict, or None).
    defaults: the component's `CONFIG`: every option and its default.
    field: where the options are configured ("config.task_options").
    owner: the component, for messages ("task question_answering").

  Returns:
    A plain dict with every option.

  Raises:
    ConfigError: an unknown option (with the nearest valid name) or one of
      the wrong type.
  """
  if isinstance(given, ml_collections.ConfigDict):
    given = given.to_dict()
  out = dict(defaults)
  for key, value in (given or {}).items():
    if key not in defaults:
      near = difflib.get_close_matches(key, defaults, n=1, cutoff=0.6)
      hint = f"; did you mean {field}.{near[0]}?" if near else ""
      valid = ", ".join(defaults) or "none"
      raise ConfigError(f"{field}.{key} is not an option of {owner}{hint} "
                        f"(its options: {valid})")
    if not type_ok(value, defaults[key]):
      raise ConfigError(
          f"{field}.{key}={value!r} has type {type(value).__name__}; "
          f"{owner} expects {type(defaults[key]).__name__} (default "
          f"{defaults[key]!r})")
    out[key] = tuple(value) if isinstance(value, list) else value
  return out

"""The `arg` of an experiment module: "key=value,key=value" after the colon.

    --config experiments/robust.py:data=cola,method=fgm,eps=0.03
    --config experiments/quickstart.py:smoke

As big_vision's `configs/common.py: parse_arg`: every experiment declares its
keys with typed defaults, and this one parser reads them for all. A value
takes its default's type (str, int, float, bool: true/false/1/0); a bare key
sets a bool to True. Lists inside a value are ";"-separated
(`files=a.txt;b.txt`, read with `split_list`).
"""

from __future__ import annotations

import ml_collections

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_arg(arg, defaults: dict, experiment: str,
              choices: dict | None = None) -> ml_collections.ConfigDict:
  """Parses `arg` over `defaults`.

  Args:
    arg: the text after the colon in `--config experiments/x.py:arg`, or
      None.
    defaults: {key: default}; the default's type is the value's type.
    experiment: the config file, named in messages
      ("experiments/robust.py").
    choices: {key: valid values} for keys with a fixed set.

  Returns:
    A ConfigDict with every key of `defaults`.

  Raises:
    ValueError: an unknown key, a value of the wrong type or outside its
      choices, naming the experiment, the key and what is valid.
  """
  values = dict(defaults)
  for item in (s.strip() for s in (arg or "").split(",")):
    if not item:
      continue
    key, sep, value = (p.strip() for p in item.partition("="))
    if key not in defaults:
      raise ValueError(f"{experiment}:{arg}: {key!r} is not a key of this "
                       f"experiment; valid: {', '.join(defaults)}")
    kind = type(defaults[key])
    if not sep:
      if kind is not bool:
        raise ValueError(f"{experiment}:{arg}: {key} needs a value "
                         f"({key}=..., a {kind.__name__})")
      value = "true"
    values[key] = _convert(value, kind, f"{experiment}:{arg}: {key}")
  for key, valid in (choices or {}).items():
    if values[key] not in valid:
      raise ValueError(f"{experiment}:{arg}: {key}={values[key]!r}; valid: "
                       f"{', '.join(map(str, valid))}")
  return ml_collections.ConfigDict(values)


def _convert(value, kind, where):
  if kind is bool:
    if value.lower() not in TRUE + FALSE:
      raise ValueError(f"{where}={value!r}: expected true or false")
    return value.lower() in TRUE
  try:
    return kind(value)
  except ValueError:
    raise ValueError(f"{where}={value!r}: expected a value of type "
                     f"{kind.__name__}") from None


def split_list(value: str) -> tuple:
  """"a.txt;b/*.txt" -> ("a.txt", "b/*.txt")."""
  return tuple(p for p in (s.strip() for s in value.split(";")) if p)

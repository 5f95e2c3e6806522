"""The one rule for a config section's keys and types.

Every section (``config.model``, ``config.data``, ``config.distill``, ...) is checked
against its defaults by ``check_section``: an unknown key or a value of another type
than the default's raises, naming the key, before anything is loaded or compiled.
"""

from __future__ import annotations

import re
from typing import Any, Mapping


def check_section(section: str, values, defaults, *, context: str = "") -> None:
  """The one rule for every config section's keys and types: unknown keys and values of
  another type than the default's raise, naming the key. A bool only for a bool; an int
  (not a bool) for an int; a number for a float; a string for a string; a sequence of
  ints for a tuple; a mapping for a dict; a key whose default is None takes any value
  (its section checks it). ``context`` is added to the unknown-key message."""
  values = dict(values)
  unknown = sorted(set(values) - set(defaults))
  if unknown:
    where = f" ({context})" if context else ""
    raise ValueError(f"unknown config key(s) {', '.join(f'{section}.{k}' for k in unknown)}"
                     f"{where}; valid: {', '.join(defaults)}")
  for key, default in defaults.items():
    if key not in values or default is None:
      continue
    value = values[key]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
      ok, kind = isinstance(value, bool), "a bool"
    elif isinstance(default, float):
      ok, kind = number, "a number"
    elif isinstance(default, int):
      ok, kind = number and isinstance(value, int), "an int"
    elif isinstance(default, str):
      ok, kind = isinstance(value, str), "a string"
    elif isinstance(default, tuple):
      ok, kind = isinstance(value, (tuple, list)) and all(
          isinstance(i, int) and not isinstance(i, bool) for i in value), "a sequence of ints"
    elif isinstance(default, dict):
      ok, kind = hasattr(value, "keys"), "a mapping"
    else:
      ok, kind = isinstance(value, type(default)), f"a {type(default).__name__}"
    if not ok:
      raise TypeError(f"{section}.{key}={value!r} must be {kind}")


def normalise(value):
  """Lists and tuples compare equal element by element (JSON turns tuples into lists)."""
  return [normalise(v) for v in value] if isinstance(value, (list, tuple)) else value


def check_regexes(section: str, values: Mapping[str, Any], keys) -> None:
  """Each of ``keys`` in ``values`` compiles as a regular expression, or raises naming it."""
  for key in keys:
    try:
      re.compile(values[key])
    except re.error as error:
      raise ValueError(f"{section}.{key}={values[key]!r} is not a regular expression: "
                       f"{error}") from None



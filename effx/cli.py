"""Config files and ``--config.a.b=value`` overrides, with errors that name the key.

``ml_collections``' own config flag reports an unknown override key as a bare
``AttributeError`` and cannot add keys; effx parses overrides itself so that a typo
names the key and the valid ones, and so that attention options can be given one by
one (``--config.model.attention_kwargs.num_features=128``): ``attention_kwargs`` is
the one mapping whose keys are open, and the attention family validates them.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import logging
import os
import sys
from typing import Callable, Sequence

from absl import logging as absl_logging
import ml_collections

OPEN_MAPPINGS = ("model.attention_kwargs",)


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


def load_module(spec: str):
  """The config file of ``path/to/config.py[:arg]`` as a module, and ``arg`` (or None)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config={spec}: no config file {path!r}")
  module_spec = importlib.util.spec_from_file_location("effx_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module, (arg or None)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``path/to/config.py`` or ``path/to/config.py:arg`` -> ``get_config([arg])``."""
  path = spec.partition(":")[0]
  module, arg = load_module(spec)
  if not hasattr(module, "get_config"):
    raise ValueError(f"--config={spec}: {path} defines no get_config()")
  return module.get_config(arg) if arg else module.get_config()


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """Separates ``--config.key=value`` arguments from the others."""
  rest, overrides = [], []
  for arg in argv:
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config."):].partition("=")
      if not eq:
        raise ValueError(f"{arg}: overrides are written --config.{key}=VALUE")
      overrides.append((key, value))
    else:
      rest.append(arg)
  return rest, overrides


def parse_value(text: str):
  """A Python literal (``128``, ``0.1``, ``True``, ``(0, 1)``, ``None``) or the string."""
  lowered = text.lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[tuple[str, str]]) -> ml_collections.ConfigDict:
  """Sets each ``(dotted key, value text)``; unknown keys and wrong types raise."""
  for key, text in overrides:
    set_value(config, key, parse_value(text), text)
  return config


def set_value(config: ml_collections.ConfigDict, key: str, value, text: str | None = None
              ) -> None:
  """Sets the dotted ``key`` to ``value``; an unknown key or a wrong type raises, naming
  the key (``text``: the value as the user wrote it, for the message)."""
  text = repr(value) if text is None else text
  *parents, leaf = key.split(".")
  node, walked = config, []
  for name in parents:
    walked.append(name)
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      raise ValueError(f"--config.{key}: unknown key config.{'.'.join(walked)}")
    node = node[name]
  open_mapping = ".".join(parents) in OPEN_MAPPINGS
  if not isinstance(node, ml_collections.ConfigDict) or (leaf not in node and not open_mapping):
    valid = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
    raise ValueError(f"--config.{key}: unknown key config.{key}; valid keys here: {valid}")
  try:
    with node.unlocked():
      node[leaf] = value
  except TypeError as error:
    raise TypeError(f"--config.{key}={text}: wrong type ({error})") from None


class _QuietLibraries(logging.Filter):
  """Keeps the libraries' info chatter (orbax logs every save) out of the run's log."""

  def filter(self, record: logging.LogRecord) -> bool:
    noisy = any(part in record.pathname for part in ("/orbax/", "/jax/", "/grain/"))
    return record.levelno >= logging.WARNING or not noisy


def quiet_libraries() -> None:
  """Filters library INFO lines out of the absl log of an entry point."""
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())


# What a user can cause and fix: a bad config or flag, a missing or unwritable path, a
# workdir holding another run, a diverged run. Anything else is a bug and keeps its
# traceback.
USER_ERRORS = (ValueError, TypeError, KeyError, OSError, FloatingPointError)
TRACEBACK_ENV = "EFFX_TRACEBACK"


def user_errors_in_one_line(main: Callable[..., None]) -> Callable[..., None]:
  """Wraps an entry point: a user error prints ``error: <message>`` to stderr and exits
  with status 1, without a traceback unless ``EFFX_TRACEBACK=1``; Ctrl-C outside the
  training loop (which checkpoints on it) exits with status 130 and one line."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except USER_ERRORS as error:
      if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        raise
      message = str(error) if not isinstance(error, KeyError) else repr(error.args[0])
      sys.stderr.write(f"error: {message}\n"
                       f"({TRACEBACK_ENV}=1 shows the traceback)\n")
      sys.exit(1)
    except KeyboardInterrupt:
      sys.stderr.write("interrupted outside the training loop (while starting or testing); "
                       "rerun the same command to resume from the newest checkpoint\n")
      sys.exit(130)

  return wrapped

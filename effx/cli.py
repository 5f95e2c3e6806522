"""How every effx command runs: flags, config files, overrides and one-line errors.

An entry module (``python -m effx.train``, ``effx.evaluate``, ...) defines its absl flags
in ``define_flags()``, does its work in ``main()`` by calling a library function, and
ends with ``cli.run(define_flags, main)``: flags parsed by absl, ``--config.a.b=value``
overrides set aside for ``main`` where the command takes a config, library INFO lines
filtered, and a user error printed as one line (``EFFX_TRACEBACK=1`` shows the
traceback).

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

import ml_collections
from absl import app, flags
from absl import logging as absl_logging

OPEN_MAPPINGS = ("model.attention_kwargs",)


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


_DEFINED: set[Callable[[], None]] = set()


def run(define_flags: Callable[[], None], main: Callable[..., int | None], argv=None, *,
        overrides: bool = False) -> int:
  """Runs an entry point.

  Args:
    define_flags: defines the command's absl flags (once per process).
    main: the command; called as ``main()``, or ``main(overrides)`` with the
      ``(dotted key, value text)`` pairs of the ``--config.*`` arguments when
      ``overrides`` is set. Returns the exit status (None: 0).
    argv: the arguments after the program name (default: ``sys.argv[1:]``). Given,
      the status is returned instead of exiting: a command can be run from Python.
    overrides: whether the command takes ``--config.key=value`` overrides.

  A user error (``USER_ERRORS``) prints ``error: <message>`` and exits with 1; Ctrl-C
  outside the training loop exits with 130.
  """
  called = argv is not None
  argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
  if called:
    # absl keeps the values of an earlier parse: a second call in one process must start
    # from the defaults, not from the flags the previous call gave.
    flags.FLAGS.unparse_flags()
  if define_flags not in _DEFINED:
    define_flags()
    _DEFINED.add(define_flags)
  found: list[tuple[str, str]] = []
  if overrides:
    try:
      argv, found = split_overrides(argv)
    except ValueError as error:
      sys.stderr.write(f"error: {error}\n")
      if called:
        return 1
      sys.exit(1)

  def program(rest):
    if len(rest) > 1:
      raise app.UsageError(f"unexpected argument(s): {' '.join(rest[1:])}")
    quiet_libraries()
    call = user_errors_in_one_line(main)
    return (call(found) if overrides else call()) or 0

  try:
    app.run(program, argv=argv)
  except SystemExit as done:
    if not called:
      raise
    return done.code or 0
  return 0


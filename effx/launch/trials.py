"""The trials of a sweep: a config file's ``sweep_<name>(add, arg)`` run, every trial's
config built and checked as ``effx.train`` would, and its ``effx.train`` command line.
``product`` and ``zipped`` build grids of overrides for config files."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import sys
from typing import Any, Iterable

from effx import cli

# A trial override naming another config file (``add(config="configs/lra_text.py:small",
# ...)``): sweeps over tasks, each with its own config. Relative to the sweep's file.
CONFIG_KEY = "config"


def product(**axes: Iterable[Any]) -> list[dict[str, Any]]:
  """Every combination: ``product(a=[1, 2], b=[3])`` -> ``[{a: 1, b: 3}, {a: 2, b: 3}]``.
  Dotted keys go through a dict: ``product(**{"model.attention": [...]})``."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def zipped(**axes: Iterable[Any]) -> list[dict[str, Any]]:
  """Values taken together: ``zipped(a=[1, 2], b=[3, 4])`` -> ``[{a: 1, b: 3}, {a: 2,
  b: 4}]``; the axes must have equal lengths."""
  columns = {k: list(v) for k, v in axes.items()}
  lengths = {len(v) for v in columns.values()}
  if len(lengths) > 1:
    raise ValueError(f"zipped(): axes of different lengths {sorted(lengths)}")
  return [dict(zip(columns, values)) for values in zip(*columns.values())]


@dataclasses.dataclass
class Trial:
  """One run of a sweep: its name (the workdir's folder), overrides and status."""

  name: str
  overrides: dict[str, Any]
  status: str = "pending"   # pending | running | done | failed | interrupted | submitted
  attempts: int = 0
  error: str = ""
  results: dict[str, Any] = dataclasses.field(default_factory=dict)


def trial_name(overrides: dict[str, Any]) -> str:
  """A folder name from the overrides: ``attention-local_learning_rate-0.01``; a trial's
  own config file is named by its file name and argument (``lra_text-small``)."""
  if not overrides:
    return "base"
  last = [k.split(".")[-1] for k in overrides]
  parts = []
  for key, short in zip(overrides, last):
    label = short if last.count(short) == 1 else key
    value = overrides[key]
    if key == CONFIG_KEY:
      path, _, arg = str(value).partition(":")
      parts.append(os.path.splitext(os.path.basename(path))[0] + (f"-{arg}" if arg else ""))
      continue
    text = json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
    parts.append(f"{label}-{text}")
  return re.sub(r"[^A-Za-z0-9._+=-]+", "-", "_".join(parts)).strip("-")[:150]


def define(spec: str, sweep: str | None) -> list[Trial]:
  """The trials ``sweep`` (None: ``sweep``; else ``sweep_<name>``) of the config file in
  ``spec`` adds, each checked as ``effx.train`` would check its config. Raises one clear
  message for an unknown sweep, a bad override (naming the trial) or repeated trials."""
  # jax comes with the checks: effx.sweep imports this module for --help too.
  from effx.training import validate  # noqa: PLC0415 (see above)

  module, arg = cli.load_module(spec)
  function = "sweep" if not sweep else f"sweep_{sweep}"
  available = sorted(n[len("sweep_"):] if n != "sweep" else "(default)"
                     for n in dir(module) if n == "sweep" or n.startswith("sweep_"))
  if not callable(getattr(module, function, None)):
    raise ValueError(f"--sweep={sweep or ''}: {spec.partition(':')[0]} defines no "
                     f"{function}(add, arg=None); sweeps there: "
                     f"{', '.join(available) or 'none'}")
  added: list[dict[str, Any]] = []

  def add(**overrides):
    added.append(dict(overrides))

  getattr(module, function)(add, arg)
  if not added:
    raise ValueError(f"--sweep={sweep or ''}: {function}() added no trial")
  trials, seen = [], {}
  for i, overrides in enumerate(added):
    name = trial_name(overrides)
    if name in seen:
      raise ValueError(f"trial {i} ({overrides}) repeats trial {seen[name]}: same name "
                       f"{name!r}")
    seen[name] = i
    try:
      validate.config(trial_config(spec, overrides))
    except (ValueError, TypeError, OSError) as error:
      raise type(error)(f"trial {name!r}: {error}") from None
    trials.append(Trial(name, overrides))
  return trials


def trial_spec(spec: str, overrides: dict[str, Any]) -> tuple[str, dict[str, Any]]:
  """``(config file[:arg], the other overrides)`` of a trial of the sweep in ``spec``."""
  rest = {k: v for k, v in overrides.items() if k != CONFIG_KEY}
  if CONFIG_KEY not in overrides:
    return spec, rest
  own = overrides[CONFIG_KEY]
  if not isinstance(own, str) or not own.partition(":")[0].endswith(".py"):
    raise ValueError(f"{CONFIG_KEY}={own!r}: a trial's config is a config file path[:arg], "
                     "e.g. 'lra_text.py:small'")
  if not os.path.isabs(own):
    own = os.path.join(os.path.dirname(os.path.abspath(spec.partition(":")[0])), own)
  return os.path.normpath(own), rest


def trial_config(spec: str, overrides: dict[str, Any]):
  """The trial's config (the sweep's file's, or its own ``config``) with ``overrides``
  set (unknown keys and wrong types raise)."""
  spec, overrides = trial_spec(spec, overrides)
  config = cli.load_config(spec)
  for key, value in overrides.items():
    cli.set_value(config, key, value)
  return config


def check_topology(spec: str, trials: list[Trial], topology: str) -> list[str]:
  """Compiles every trial's training step for ``topology`` (``effx.training.aot``); returns one
  line per trial and raises naming the trials that do not fit or do not divide it."""
  from effx.training import aot  # noqa: PLC0415 (jax, as in define)

  lines, bad = [], []
  aot.topology_devices(topology)  # a bad name or a missing libtpu: one message, once
  for trial in trials:
    try:
      result = aot.check(trial_config(spec, trial.overrides), topology)
      lines.append(f"{trial.name}: {aot.describe(result)}")
    except (ValueError, TypeError) as error:
      lines.append(f"{trial.name}: does not run on {topology}: {error}")
      bad.append(trial.name)
    print(lines[-1], flush=True)
  if bad:
    raise ValueError(f"{len(bad)} of {len(trials)} trials cannot run on {topology}: "
                     f"{', '.join(bad)}")
  return lines


def command(spec: str, workdir: str, trial: Trial, *, python: str = sys.executable,
            distributed: bool = False) -> list[str]:
  """The ``effx.train`` command line of ``trial`` (values written so that ``effx.train``
  parses them back to the same values); ``distributed`` adds ``--distributed`` (every
  process calls ``jax.distributed.initialize()``, which reads Slurm's or the TPU's
  environment)."""
  spec, overrides = trial_spec(spec, trial.overrides)
  return [python, "-m", "effx.train", f"--config={spec}",
          f"--workdir={os.path.join(workdir, trial.name)}",
          *(["--distributed"] if distributed else []),
          *(f"--config.{k}={_text(v)}" for k, v in overrides.items())]


def _text(value) -> str:
  """``value`` as ``effx.train`` reads it back: a plain word stays plain, anything else
  is a Python literal."""
  if isinstance(value, str) and cli.parse_value(value) == value:
    return value
  return repr(value)

"""One run per workdir: the stored config, the changes a resume may make, and the run's
sessions.

A workdir holds one run. ``config.json`` is the config it runs under; a rerun compares
its config with it. Keys in ``HARMLESS`` (how long, how often to evaluate, log and
checkpoint, how many checkpoints to keep, how many examples to evaluate, data threads)
may change between sessions and are recorded in ``sessions.json``; any other
difference (task, data, model, optimizer, seed, mesh ...) would resume a state under
math it was not trained with, so the run refuses to start and names the keys.

``sessions.json`` lists every process that worked on the run: when it started, the step
it resumed from, the step it reached, its wall time, how it ended and the harmless keys
it changed. It is rewritten atomically at every checkpoint and at the end, so a session
killed without warning keeps the time up to its last checkpoint.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from typing import Any

from effx.common import files
from effx.common.schema import normalise

# Changing these never changes what a resumed step computes.
HARMLESS = ("num_train_steps", "eval_every_steps", "checkpoint_every_steps",
            "keep_checkpoints", "log_every_steps", "max_eval_examples", "max_test_examples",
            "data_threads", "init_checkpoint", "data.cache_dir")


class ConfigMismatchError(ValueError):
  """The workdir's run was started with a config that its checkpoints depend on."""


def write_json_atomic(path: str, value: Any) -> None:
  """Writes ``value`` as JSON to ``path`` so that a reader (or a killed writer) never
  sees half a file (``effx.common.files.write_text_atomic``)."""
  files.write_text_atomic(path, json.dumps(value, indent=2))


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"model": {"emb_dim": 64}}`` -> ``{"model.emb_dim": 64}``; lists stay values."""
  out = {}
  for key, value in values.items():
    if isinstance(value, dict) and value:
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def differences(stored: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """``{dotted key: (stored value, new value)}`` for every key whose value differs (a
  key missing on one side counts as ``"<unset>"``)."""
  a, b = flatten(stored), flatten(new)
  missing = "<unset>"
  return {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
          if normalise(a.get(k, missing)) != normalise(b.get(k, missing))}


def check_resume(workdir: str, config_values: dict[str, Any],
                 default_values: dict[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
  """Compares ``config_values`` (the JSON form of the config) with the run already in
  ``workdir``. A key the stored config lacks (added to effx since) counts as unchanged
  while its value is the default in ``default_values``. Returns the harmless changes
  (empty for a new run); raises ``ConfigMismatchError`` listing every other change and
  the ways out."""
  path = os.path.join(workdir, "config.json")
  if not files.exists(path):
    return {}
  stored = json.loads(files.read_text(path))
  changed = differences(stored, config_values)
  added = flatten(default_values or {})
  changed = {k: v for k, v in changed.items()
             if not (v[0] == "<unset>" and k in added
                     and normalise(added[k]) == normalise(v[1]))}
  harmful = {k: v for k, v in changed.items() if k not in HARMLESS}
  schedule = config_values.get("schedule")
  prune = config_values.get("prune", {})
  if "num_train_steps" in changed and (schedule == "cosine" or (
      prune.get("method", "none") != "none" and not prune.get("end_step"))):
    # The cosine schedule ends at num_train_steps, and pruning by default at 80% of it:
    # a new length changes every step's learning rate or sparsity.
    harmful["num_train_steps"] = changed["num_train_steps"]
  if harmful:
    lines = "\n".join(f"  {k}: {old!r} (stored) -> {new!r} (now)"
                      for k, (old, new) in harmful.items())
    checkpoints = os.path.join(workdir, "checkpoints")
    saved = files.isdir(checkpoints) and any(n.isdigit() for n in files.listdir(checkpoints))
    ways_out = (f"Use another --workdir, or start a new run from this one's parameters with "
                f"--workdir=<new> --config.init_checkpoint={workdir}" if saved else
                "It has no checkpoint yet: use another --workdir, or delete this one")
    raise ConfigMismatchError(
        f"workdir {workdir} holds a run started with a different config; resuming it "
        f"under this one would change its results:\n{lines}\n{ways_out}")
  return changed


class Sessions:
  """The run's ``sessions.json``: one entry per process that trained it (process 0
  writes; other processes keep the bookkeeping but write nothing)."""

  def __init__(self, workdir: str, start_step: int, changes: dict[str, tuple[Any, Any]],
               *, started_at: float | None = None, enabled: bool = True):
    """``started_at``: the session's ``time.perf_counter()`` start (default: now)."""
    self._path = os.path.join(workdir, "sessions.json")
    self._enabled = enabled
    self._start = time.perf_counter() if started_at is None else started_at
    self.previous: list[dict[str, Any]] = []
    if files.exists(self._path):
      self.previous = json.loads(files.read_text(self._path))
      for session in self.previous:
        if session["status"] == "running":  # killed without warning
          session["status"] = "killed"
    self.current = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "start_step": start_step, "step": start_step, "wall_time_s": 0.0,
        "status": "running",
        "config_changes": {k: {"stored": old, "now": new} for k, (old, new) in changes.items()},
    }

  def update(self, step: int, status: str = "running") -> None:
    self.current.update(step=int(step), status=status,
                        wall_time_s=round(time.perf_counter() - self._start, 3))
    if self._enabled:
      write_json_atomic(self._path, self.all())

  def all(self) -> list[dict[str, Any]]:
    return [*self.previous, self.current]


def steps_reached(workdir: str) -> int:
  """The furthest step any session of the run in ``workdir`` reached (0: none)."""
  path = os.path.join(workdir, "sessions.json")
  if not files.exists(path):
    return 0
  return max((int(s.get("step", 0)) for s in json.loads(files.read_text(path))), default=0)

"""What a sweep's workdir records: ``sweep.json`` (every trial's overrides, status and
results, written atomically after every change), each trial's results and log, and how
an attempt's end is recorded (done, retried once per invocation, or failed with the end
of its log)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from typing import Any, Callable

from effx.common import files
from effx.launch.trials import Trial
from effx.training import workdir as workdir_lib

MANIFEST = "sweep.json"
RETRIES = 1  # per invocation: a failing trial runs at most 1 + RETRIES times


class Manifest:
  """``<workdir>/sweep.json``: the sweep's definition and every trial's state."""

  def __init__(self, workdir: str, spec: str, sweep: str | None, trials: list[Trial]):
    self.path = os.path.join(workdir, MANIFEST)
    self.spec, self.sweep = spec, sweep
    self.trials = trials
    if files.exists(self.path):
      stored = json.loads(files.read_text(self.path))
      if stored["config"] != spec or stored["sweep"] != sweep:
        raise ValueError(f"{workdir} holds the sweep {stored['sweep'] or '(default)'} of "
                         f"{stored['config']}, not {sweep or '(default)'} of {spec}; use "
                         "another --workdir")
      previous = {t["name"]: t for t in stored["trials"]}
      for trial in trials:
        old = previous.get(trial.name)
        if old is not None and old["overrides"] == jsonable(trial.overrides):
          trial.status, trial.error = old["status"], old["error"]
          trial.attempts, trial.results = old["attempts"], old["results"]
          if trial.status in ("running", "interrupted", "failed"):
            trial.status = "pending"  # resumed (or retried) by this invocation

  def save(self) -> None:
    workdir_lib.write_json_atomic(self.path, {
        "config": self.spec, "sweep": self.sweep,
        "trials": [{**dataclasses.asdict(t), "overrides": jsonable(t.overrides)}
                   for t in self.trials]})


def jsonable(value):
  return json.loads(json.dumps(value))


def read_results(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, "results.json")
  if not files.exists(path):
    return None
  values = json.loads(files.read_text(path))
  keep = ("test_accuracy", "eval_accuracy", "test_bpb", "eval_bpb", "test_cosine",
          "eval_cosine", "best_step", "step",
          "wall_time_s", "peak_memory_bytes", "num_parameters")
  return {k: values[k] for k in keep if k in values}


def log_tail(path: str) -> str:
  try:
    lines = [line.strip() for line in files.read_text(path).splitlines() if line.strip()]
  except (OSError, UnicodeDecodeError):
    return ""
  errors = [line for line in lines if line.startswith("error:") or "Error" in line]
  return (errors or lines or [""])[-1][:500]


def settle(workdir: str, trial: Trial, returncode: int, log: str, tries: int,
            progress: Callable[[int], None] | None) -> bool:
  """Records how an attempt of ``trial`` ended; True when it is to be run again."""
  results = read_results(os.path.join(workdir, trial.name))
  if returncode == 0 and results is not None:
    trial.status, trial.error, trial.results = "done", "", results
  elif tries <= RETRIES:
    trial.status = "pending"
    return True
  else:
    trial.status = "failed"
    trial.error = log_tail(log) or f"exit status {returncode}"
  if progress:
    progress(1)
  return False


def refresh(workdir: str, manifest: Manifest) -> None:
  """Marks done every trial whose workdir holds results (trials run by another launcher
  or another invocation), and reads every finished trial's results again (its
  ``results.json`` is the record; a newer effx may report more of it)."""
  for trial in manifest.trials:
    results = read_results(os.path.join(workdir, trial.name))
    if results is not None:
      trial.status, trial.error, trial.results = "done", "", results


def local_log(workdir: str, trial: Trial) -> str:
  """Where a trial's output is written as it runs: ``<workdir>/logs/<name>.log``, or for
  a bucket a local file copied there after each attempt (``keep_log``)."""
  folder = os.path.join(workdir, "logs")
  if files.is_remote(workdir):
    folder = os.path.join(stage(workdir), "logs")
  os.makedirs(folder, exist_ok=True)
  return os.path.join(folder, f"{trial.name}.log")


def keep_log(workdir: str, trial: Trial) -> None:
  if files.is_remote(workdir):
    files.upload(local_log(workdir, trial),
                 os.path.join(workdir, "logs", f"{trial.name}.log"))


def stage(workdir: str) -> str:
  """A local folder of the sweep's own (the packed checkout of the tpu launcher)."""
  key = re.sub(r"[^A-Za-z0-9]+", "-", workdir)[-100:]
  return os.path.join(tempfile.gettempdir(), f"effx-sweep-{key}")

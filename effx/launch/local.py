"""The local launcher: each trial a ``python -m effx.train`` subprocess, ``--parallel``
at a time, one GPU each (``nvidia-smi -L``) or a share of the CPU cores (affinity)."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from typing import Any, Callable

from effx.launch.manifest import Manifest, keep_log, local_log, settle
from effx.launch.trials import Trial, command


def _gpus() -> list[str]:
  """GPU indices this process may use (``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi -L``)."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return [g for g in visible.split(",") if g.strip()]
  if shutil.which("nvidia-smi") is None:
    return []
  try:
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                             timeout=20).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU")]


def trial_slots(parallel: int) -> list[dict[str, Any]]:
  """What each of the ``parallel`` slots runs on: one GPU each, or a share of the cores."""
  gpus = _gpus()
  if gpus:
    if parallel > len(gpus):
      raise ValueError(f"--parallel={parallel} but {len(gpus)} GPU(s) visible: one GPU per "
                       "trial")
    return [{"env": {"CUDA_VISIBLE_DEVICES": g}, "cpus": None} for g in gpus[:parallel]]
  cores = sorted(os.sched_getaffinity(0))
  return [{"env": {}, "cpus": cores[i::parallel] or cores} for i in range(parallel)]


def start_trial(argv: list[str], log, env: dict[str, str], cpus: list[int] | None
                ) -> subprocess.Popen:
  """Starts a trial's ``effx.train``, writing to ``log``, on ``cpus`` (None: all).

  Its own process group, so that Ctrl-C in a terminal reaches the launcher alone, which
  then sends the trainer one SIGTERM (a trainer's second signal exits without a
  checkpoint); and (Linux) a signal when the launcher dies, so that a killed launcher
  leaves no trainer running on: SIGHUP, on which the trainer checkpoints and exits
  (the rerun resumes it)."""

  def setup() -> None:  # runs in the child between fork and exec: nothing that locks
    if cpus:
      os.sched_setaffinity(0, cpus)
    if _LIBC is not None:
      # A launcher under nohup ignores SIGHUP, and its children would inherit that.
      signal.signal(signal.SIGHUP, signal.SIG_DFL)
      _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGHUP)

  with warnings.catch_warnings():
    # jax warns at every fork of a process that has imported it; the child above only
    # sets its cores and death signal before exec.
    warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **env}, start_new_session=True,
                            preexec_fn=setup)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Loaded here, not in the forked child (dlopen there could wait on a lock another thread
# held at the fork).
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def run_local(spec: str, workdir: str, manifest: Manifest, parallel: int,
              progress: Callable[[int], None] | None = None) -> None:
  """Runs the manifest's pending trials, ``parallel`` at a time, until each is done or
  has failed ``1 + RETRIES`` times; updates the manifest after every change."""
  slots = trial_slots(parallel)
  queue = [t for t in manifest.trials if t.status == "pending"]
  running: dict[int, tuple[Trial, subprocess.Popen, Any]] = {}
  tries = {t.name: 0 for t in queue}

  def start(slot: int, trial: Trial) -> None:
    tries[trial.name] += 1
    trial.status, trial.attempts = "running", trial.attempts + 1
    log = open(local_log(workdir, trial), "a", encoding="utf-8")
    cpus = slots[slot]["cpus"]
    process = start_trial(command(spec, workdir, trial), log, slots[slot]["env"], cpus)
    running[slot] = (trial, process, log)
    manifest.save()

  try:
    while queue or running:
      for slot in range(len(slots)):
        if slot not in running and queue:
          start(slot, queue.pop(0))
      time.sleep(0.2)
      for slot, (trial, process, log) in list(running.items()):
        if process.poll() is None:
          continue
        log.close()
        keep_log(workdir, trial)
        del running[slot]
        if settle(workdir, trial, process.returncode, log.name, tries[trial.name], progress):
          queue.append(trial)
        manifest.save()
  except KeyboardInterrupt:
    for trial, process, log in running.values():
      process.send_signal(signal.SIGTERM)  # the trainer checkpoints, then exits
    for trial, process, log in running.values():
      process.wait()
      log.close()
      keep_log(workdir, trial)
      trial.status = "interrupted"
    manifest.save()
    raise

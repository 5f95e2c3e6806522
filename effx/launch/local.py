"""The local launcher: each trial a ``python -m effx.train`` subprocess, ``--parallel``
at a time, one GPU each (``nvidia-smi -L``) or a share of the CPU cores (affinity)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
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


def _slots(parallel: int) -> list[dict[str, Any]]:
  """What each of the ``parallel`` slots runs on: one GPU each, or a share of the cores."""
  gpus = _gpus()
  if gpus:
    if parallel > len(gpus):
      raise ValueError(f"--parallel={parallel} but {len(gpus)} GPU(s) visible: one GPU per "
                       "trial")
    return [{"env": {"CUDA_VISIBLE_DEVICES": g}, "cpus": None} for g in gpus[:parallel]]
  cores = sorted(os.sched_getaffinity(0))
  return [{"env": {}, "cpus": cores[i::parallel] or cores} for i in range(parallel)]


def run_local(spec: str, workdir: str, manifest: Manifest, parallel: int,
              progress: Callable[[int], None] | None = None) -> None:
  """Runs the manifest's pending trials, ``parallel`` at a time, until each is done or
  has failed ``1 + RETRIES`` times; updates the manifest after every change."""
  slots = _slots(parallel)
  queue = [t for t in manifest.trials if t.status == "pending"]
  running: dict[int, tuple[Trial, subprocess.Popen, Any]] = {}
  tries = {t.name: 0 for t in queue}

  def start(slot: int, trial: Trial) -> None:
    tries[trial.name] += 1
    trial.status, trial.attempts = "running", trial.attempts + 1
    log = open(local_log(workdir, trial), "a", encoding="utf-8")
    cpus = slots[slot]["cpus"]
    process = subprocess.Popen(
        command(spec, workdir, trial), stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, **slots[slot]["env"]},
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
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

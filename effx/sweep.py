"""Sweeps: a grid of runs from one config file, launched on this machine, resumed by
rerunning the same command, read as one table.

  python -m effx.sweep --config=configs/lra_listops.py:small --workdir=/tmp/sweep \\
      --sweep=families [--parallel=2] [--dry-run] [--report]

A config file defines ``sweep(add, arg=None)`` (used without ``--sweep``) or
``sweep_<name>(add, arg=None)`` (``--sweep=<name>``); ``arg`` is the config's ``:arg``.
It calls ``add(**overrides)`` once per trial, keyed by dotted config keys:
``add(**{"model.attention": "local", "learning_rate": 0.01})``. ``product`` and
``zipped`` build grids of such dicts. A trial may name its own config file,
``add(config="lra_text.py:small", ...)`` (relative to the sweep's file): a sweep over
tasks (``configs/lra.py``). A sweep over attention families x tasks is reported as LRA's
Table 1 (a row per family, a column per task, their average) with a heat map.

Every trial's config is built and checked as ``effx.train`` would (keys, types, the
whole config) before anything runs. Each trial gets ``<workdir>/<name>``, its name made
from its overrides, and ``<workdir>/sweep.json`` records trial -> overrides -> status ->
results (written atomically after every change). Rerunning the command resumes the
sweep: finished trials are skipped, interrupted ones resume from their own checkpoints
(the workdir's resume), a failing trial is retried once per invocation and then
recorded as failed with the end of its log; one failure never stops the others. Ctrl-C
stops the running trials (each checkpoints first) and leaves them to the next rerun.

Slurm launcher (``--launcher=slurm``): ``<workdir>/slurm/sweep.sbatch`` runs the
unfinished trials as one job array (``--parallel`` tasks at a time, ``--nodes`` per trial
with ``--distributed`` when more than one), submitted with ``sbatch``; ``--report`` reads
the results as they arrive, ``--resubmit`` submits what an ended job left unfinished.

TPU launcher (``--launcher=tpu --tpu=NAME --zone=ZONE --accelerator=v5litepod-16
[--queued]``, ``--workdir=gs://...``): creates the TPU VM or pod slice unless it exists,
installs this checkout on every worker and runs each trial on all of them at once with
``--distributed`` (``effx.tpu``). Workdirs may be buckets with any launcher
(``effx.files``).

Local launcher: each trial is a ``python -m effx.train`` subprocess, ``--parallel`` at a
time; with GPUs (``nvidia-smi -L``) each trial gets one through ``CUDA_VISIBLE_DEVICES``,
otherwise the CPU cores are split between the running trials (CPU affinity). Logs go to
``<workdir>/logs/<name>.log``. At the end (or with ``--report``) ``results.md`` and
``results.csv`` give each trial's best-on-validation test accuracy, validation accuracy,
steps per second and peak memory, and ``curves.png`` the validation curves; trials that
have not finished show their status, never numbers.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterable

from effx import cli, files

RETRIES = 1  # per invocation: a failing trial runs at most 1 + RETRIES times
MANIFEST = "sweep.json"
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
  from effx import validate  # noqa: PLC0415 (imports jax: not needed by --help)

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
  """Compiles every trial's training step for ``topology`` (``effx.aot``); returns one
  line per trial and raises naming the trials that do not fit or do not divide it."""
  from effx import aot  # noqa: PLC0415

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
        if old is not None and old["overrides"] == _jsonable(trial.overrides):
          trial.status, trial.error = old["status"], old["error"]
          trial.attempts, trial.results = old["attempts"], old["results"]
          if trial.status in ("running", "interrupted", "failed"):
            trial.status = "pending"  # resumed (or retried) by this invocation

  def save(self) -> None:
    from effx import workdir as workdir_lib  # noqa: PLC0415

    workdir_lib.write_json_atomic(self.path, {
        "config": self.spec, "sweep": self.sweep,
        "trials": [{**dataclasses.asdict(t), "overrides": _jsonable(t.overrides)}
                   for t in self.trials]})


def _jsonable(value):
  return json.loads(json.dumps(value))


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


def _read_results(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, "results.json")
  if not files.exists(path):
    return None
  values = json.loads(files.read_text(path))
  keep = ("test_accuracy", "eval_accuracy", "test_bpb", "eval_bpb", "test_cosine",
          "eval_cosine", "best_step", "step",
          "wall_time_s", "peak_memory_bytes", "num_parameters")
  return {k: values[k] for k in keep if k in values}


def _log_tail(path: str) -> str:
  try:
    lines = [line.strip() for line in files.read_text(path).splitlines() if line.strip()]
  except (OSError, UnicodeDecodeError):
    return ""
  errors = [line for line in lines if line.startswith("error:") or "Error" in line]
  return (errors or lines or [""])[-1][:500]


def _settle(workdir: str, trial: Trial, returncode: int, log: str, tries: int,
            progress: Callable[[int], None] | None) -> bool:
  """Records how an attempt of ``trial`` ended; True when it is to be run again."""
  results = _read_results(os.path.join(workdir, trial.name))
  if returncode == 0 and results is not None:
    trial.status, trial.error, trial.results = "done", "", results
  elif tries <= RETRIES:
    trial.status = "pending"
    return True
  else:
    trial.status = "failed"
    trial.error = _log_tail(log) or f"exit status {returncode}"
  if progress:
    progress(1)
  return False


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
    log = open(_local_log(workdir, trial), "a", encoding="utf-8")
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
        _keep_log(workdir, trial)
        del running[slot]
        if _settle(workdir, trial, process.returncode, log.name, tries[trial.name], progress):
          queue.append(trial)
        manifest.save()
  except KeyboardInterrupt:
    for trial, process, log in running.values():
      process.send_signal(signal.SIGTERM)  # the trainer checkpoints, then exits
    for trial, process, log in running.values():
      process.wait()
      log.close()
      _keep_log(workdir, trial)
      trial.status = "interrupted"
    manifest.save()
    raise


def _local_log(workdir: str, trial: Trial) -> str:
  """Where a trial's output is written as it runs: ``<workdir>/logs/<name>.log``, or for
  a bucket a local file copied there after each attempt (``_keep_log``)."""
  folder = os.path.join(workdir, "logs")
  if files.is_remote(workdir):
    folder = os.path.join(_stage(workdir), "logs")
  os.makedirs(folder, exist_ok=True)
  return os.path.join(folder, f"{trial.name}.log")


def _keep_log(workdir: str, trial: Trial) -> None:
  if files.is_remote(workdir):
    files.upload(_local_log(workdir, trial),
                 os.path.join(workdir, "logs", f"{trial.name}.log"))


def tpu_plan(spec: str, workdir: str, trials: list[Trial], pod) -> list[list[str]]:
  """Every command the ``tpu`` launcher runs for ``trials``, in order (creation first,
  done only when ``pod.describe()`` fails; with ``--queued``, then waiting until the
  queued resource is ACTIVE)."""
  from effx import tpu  # noqa: PLC0415

  archive = os.path.join(_stage(workdir), tpu.ARCHIVE)
  specs = [spec, *(trial_spec(spec, t.overrides)[0] for t in trials)]
  return [pod.create(), *tpu.setup(pod, specs, archive),
          *(pod.ssh(tpu.worker_command(command(spec, workdir, t, python="python3",
                                               distributed=True)))
            for t in trials)]


def _checked(cmd: list[str]) -> None:
  """Runs a setup command; its failure is one message naming it."""
  if subprocess.run(cmd).returncode != 0:
    raise OSError(f"this failed (its output is above): {shlex.join(cmd)}")


def _stage(workdir: str) -> str:
  """A local folder of the sweep's own (the packed checkout of the tpu launcher)."""
  key = re.sub(r"[^A-Za-z0-9]+", "-", workdir)[-100:]
  return os.path.join(tempfile.gettempdir(), f"effx-sweep-{key}")


def run_tpu(spec: str, workdir: str, manifest: Manifest, pod,
            progress: Callable[[int], None] | None = None) -> None:
  """Runs the manifest's pending trials one after another on every worker of ``pod``
  (an ``effx.tpu.Pod``), creating it first when it does not exist."""
  pending = [t for t in manifest.trials if t.status == "pending"]
  if not pending:
    return
  if shutil.which("gcloud") is None:
    raise FileNotFoundError("gcloud not found: the tpu launcher runs the Google Cloud CLI "
                            "(cloud.google.com/sdk); --dry-run prints its commands")
  create, *setup_commands = tpu_plan(spec, workdir, pending, pod)[:4]
  if subprocess.run(pod.describe(), capture_output=True).returncode != 0:
    print(f"creating {pod.name}: {shlex.join(create)}", flush=True)
    _checked(create)
    while pod.queued:
      state = subprocess.run(pod.state(), capture_output=True, text=True).stdout.strip()
      if state == "ACTIVE":
        break
      if state in ("FAILED", "SUSPENDED"):
        raise RuntimeError(f"the queued resource {pod.name} is {state}: "
                           f"{shlex.join(pod.state()[:-1])} says why")
      time.sleep(60)
  os.makedirs(_stage(workdir), exist_ok=True)
  for step in setup_commands:
    _checked(step)
  from effx import tpu  # noqa: PLC0415

  queue, tries = list(pending), {t.name: 0 for t in pending}
  while queue:
    trial = queue.pop(0)
    tries[trial.name] += 1
    trial.status, trial.attempts = "running", trial.attempts + 1
    manifest.save()
    remote = tpu.worker_command(command(spec, workdir, trial, python="python3",
                                        distributed=True))
    with open(_local_log(workdir, trial), "a", encoding="utf-8") as log:
      try:
        returncode = subprocess.run(pod.ssh(remote), stdout=log,
                                    stderr=subprocess.STDOUT).returncode
      except KeyboardInterrupt:
        trial.status = "interrupted"  # resumes from its last checkpoint on the rerun
        manifest.save()
        raise
      finally:
        log.close()
        _keep_log(workdir, trial)
    if _settle(workdir, trial, returncode, _local_log(workdir, trial), tries[trial.name],
               progress):
      queue.append(trial)
    manifest.save()


def slurm_script(spec: str, workdir: str, trials: list[Trial], *, parallel: int, nodes: int,
                 gpus_per_node: int, time_limit: str, partition: str, sweep: str | None
                 ) -> tuple[str, str]:
  """``(sbatch script, commands file)`` running ``trials`` as one Slurm job array,
  ``parallel`` array tasks at a time, each on ``nodes`` nodes with one process per node
  (multi-node trials initialise ``jax.distributed`` from Slurm's environment)."""
  commands_path = os.path.join(workdir, "slurm", "commands.txt")
  commands = "".join(shlex.join(command(spec, workdir, t, python="python",
                                        distributed=nodes > 1)) + "\n" for t in trials)
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name=effx-{sweep or 'sweep'}",
           f"#SBATCH --array=0-{len(trials) - 1}%{parallel}",
           f"#SBATCH --nodes={nodes}",
           "#SBATCH --ntasks-per-node=1",
           *([f"#SBATCH --gpus-per-node={gpus_per_node}"] if gpus_per_node else []),
           f"#SBATCH --time={time_limit}",
           *([f"#SBATCH --partition={partition}"] if partition else []),
           f"#SBATCH --output={os.path.join(workdir, 'logs', 'slurm-%A_%a.log')}",
           "set -euo pipefail",
           f"cd {shlex.quote(os.getcwd())}",
           "# Line SLURM_ARRAY_TASK_ID + 1 of the commands file is this task's trial.",
           f'line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(commands_path)})',
           'srun bash -c "$line"']
  return "\n".join(lines) + "\n", commands


def submit_slurm(spec: str, workdir: str, manifest: Manifest, *, resubmit: bool = False,
                 **options) -> str:
  """Writes ``<workdir>/slurm/{sweep.sbatch,commands.txt}`` for the unfinished trials and
  submits the script with ``sbatch``; returns sbatch's answer. Trials submitted before
  that have no results yet are submitted again only with ``resubmit`` (two jobs must
  not train one workdir at once)."""
  waiting = [t.name for t in manifest.trials if t.status == "submitted"]
  if waiting and not resubmit:
    raise ValueError(f"{len(waiting)} trial(s) were submitted before and have no results "
                     f"yet ({', '.join(waiting[:3])}{', ...' if len(waiting) > 3 else ''}); "
                     "--report shows the results so far; once that job has ended, "
                     "--resubmit submits the unfinished trials again")
  pending = [t for t in manifest.trials if t.status != "done"]
  if not pending:
    return "every trial is done"
  script, commands = slurm_script(spec, workdir, pending, sweep=manifest.sweep, **options)
  files.makedirs(os.path.join(workdir, "slurm"))
  files.makedirs(os.path.join(workdir, "logs"))
  for name, text in (("sweep.sbatch", script), ("commands.txt", commands)):
    files.write_text_atomic(os.path.join(workdir, "slurm", name), text)
  if shutil.which("sbatch") is None:
    raise FileNotFoundError(f"sbatch not found: the job script is {workdir}/slurm/"
                            "sweep.sbatch; submit it where Slurm runs (sbatch <script>)")
  answer = subprocess.run(["sbatch", os.path.join(workdir, "slurm", "sweep.sbatch")],
                          capture_output=True, text=True, check=True).stdout.strip()
  for trial in pending:
    trial.status = "submitted"
  manifest.save()
  return answer


def refresh(workdir: str, manifest: Manifest) -> None:
  """Marks done every trial whose workdir holds results (trials run by another launcher
  or another invocation), and reads every finished trial's results again (its
  ``results.json`` is the record; a newer effx may report more of it)."""
  for trial in manifest.trials:
    results = _read_results(os.path.join(workdir, trial.name))
    if results is not None:
      trial.status, trial.error, trial.results = "done", "", results


# LRA's column names and order (Tay et al. 2021, Table 1), by config file.
TASK_COLUMNS = {"lra_listops": "ListOps", "lra_text": "Text", "lra_retrieval": "Retrieval",
                "lra_image": "Image", "lra_pathfinder": "Pathfinder", "lra_pathx": "Path-X"}


def report(workdir: str, manifest: Manifest) -> list[str]:
  """Writes ``results.md``, ``results.csv`` and ``curves.png`` (and, for a sweep over
  attention families x tasks, LRA Table 1's layout first in ``results.md`` and a heat map
  ``table.png``); returns the lines of ``results.md``'s tables."""
  keys = list(dict.fromkeys(k for t in manifest.trials for k in t.overrides))
  rows = []
  for trial in manifest.trials:
    r = trial.results if trial.status == "done" else {}
    steps_per_s = (r["step"] / r["wall_time_s"]) if r.get("wall_time_s") else None
    rows.append({"trial": trial.name, **{k: trial.overrides.get(k, "") for k in keys},
                 "status": trial.status,
                 "test_accuracy": r.get("test_accuracy"), "eval_accuracy": r.get("eval_accuracy"),
                 "test_bpb": r.get("test_bpb"), "eval_bpb": r.get("eval_bpb"),
                 "test_cosine": r.get("test_cosine"), "eval_cosine": r.get("eval_cosine"),
                 "best_step": r.get("best_step"), "steps_per_s": steps_per_s,
                 "peak_memory_mb": (r["peak_memory_bytes"] / 2**20
                                    if r.get("peak_memory_bytes") else None),
                 "error": trial.error})
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
  writer.writeheader()
  writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
  files.write_text_atomic(os.path.join(workdir, "results.csv"), text.getvalue())
  # Language models are chosen by bits per byte, distilled sentence encoders by their
  # cosine to the teacher: show those columns instead.
  metric = "accuracy"
  for other in ("bpb", "cosine"):
    if (any(r[f"test_{other}"] is not None for r in rows)
        and all(r["test_accuracy"] is None for r in rows)):
      metric = other
  shown = ["trial", *keys, "status", f"test_{metric}", f"eval_{metric}", "steps_per_s",
           "peak_memory_mb"]
  lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
  for row in rows:
    cells = []
    for k in shown:
      v = row[k]
      if k in ("test_accuracy", "eval_accuracy"):
        v = "" if v is None else f"{100 * v:.1f}%"
      elif k in ("test_bpb", "eval_bpb", "test_cosine", "eval_cosine"):
        v = "" if v is None else f"{v:.4f}"
      elif k in ("steps_per_s", "peak_memory_mb"):
        v = "" if v is None else f"{v:.1f}"
      cells.append(str(v))
    lines.append("| " + " | ".join(cells) + " |")
  done = [r for r in rows if r["status"] == "done" and r["test_accuracy"] is not None]
  if done:
    mean = sum(r["test_accuracy"] for r in done) / len(done)
    lines.append(f"\nMean test accuracy over the {len(done)} finished of {len(rows)} trials: "
                 f"{100 * mean:.2f}%.")
  grid = families_by_tasks(manifest)
  if grid is not None:
    lines = [*_lra_table(*grid), "", *lines]
  files.write_text_atomic(
      os.path.join(workdir, "results.md"),
      f"Sweep {manifest.sweep or '(default)'} of `{manifest.spec}`\n\n" + "\n".join(lines)
      + "\n")
  _save_figure(_plot_curves(workdir, manifest), os.path.join(workdir, "curves.png"))
  if grid is not None:
    _save_figure(_plot_grid(*grid, title=f"sweep {manifest.sweep or '(default)'}"),
                 os.path.join(workdir, "table.png"))
  return lines


def families_by_tasks(manifest: Manifest):
  """``(families, tasks, {(family, task): trial})`` when the sweep's trials span more
  than one attention family and more than one task (config file), else None."""
  cells = {}
  for trial in manifest.trials:
    spec, _ = trial_spec(manifest.spec, trial.overrides)
    stem = os.path.splitext(os.path.basename(spec.partition(":")[0]))[0]
    family = trial_config(manifest.spec, trial.overrides).model.attention
    if (family, stem) in cells:
      return None  # another axis too (learning rates, sizes): one row per trial then
    cells[family, stem] = trial
  families = list(dict.fromkeys(f for f, _ in cells))
  order = list(TASK_COLUMNS)
  tasks = sorted(dict.fromkeys(t for _, t in cells),
                 key=lambda t: (order.index(t) if t in order else len(order), t))
  if len(families) < 2 or len(tasks) < 2:
    return None
  return families, tasks, cells


def _lra_table(families, tasks, cells) -> list[str]:
  """LRA Table 1's layout: a row per family, a column per task and their average (test
  accuracy of the best-on-validation checkpoint); unfinished cells show their status."""
  names = [TASK_COLUMNS.get(t, t) for t in tasks]
  lines = ["| Model | " + " | ".join(names) + " | Avg |", "|---|" + "---:|" * (len(tasks) + 1)]
  for family in families:
    cells_row, values = [], []
    for task in tasks:
      trial = cells.get((family, task))
      if trial is None:
        cells_row.append("")
      elif trial.status == "done":
        values.append(100 * trial.results["test_accuracy"])
        cells_row.append(f"{values[-1]:.2f}")
      else:
        cells_row.append(trial.status)
    average = f"{sum(values) / len(values):.2f}" if len(values) == len(tasks) else ""
    lines.append(f"| {family} | " + " | ".join(cells_row) + f" | {average} |")
  return lines


def _save_figure(fig, path: str) -> None:
  import matplotlib.pyplot as plt  # noqa: PLC0415

  with tempfile.TemporaryDirectory() as folder:
    local = os.path.join(folder, os.path.basename(path))
    fig.savefig(local, dpi=110)
    plt.close(fig)
    if files.is_remote(path):
      files.upload(local, path)
    else:
      os.replace(local, path)


def _pyplot():
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  return plt


def _plot_grid(families, tasks, cells, *, title: str):
  """A heat map of test accuracy, families x tasks; unfinished cells blank."""
  import numpy as np  # noqa: PLC0415

  plt = _pyplot()
  values = np.full((len(families), len(tasks)), np.nan)
  for (family, task), trial in cells.items():
    if trial.status == "done":
      values[families.index(family), tasks.index(task)] = 100 * trial.results["test_accuracy"]
  fig, ax = plt.subplots(figsize=(1.4 * len(tasks) + 2.5, 0.38 * len(families) + 1.5))
  image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
  for i in range(len(families)):
    for j in range(len(tasks)):
      if not np.isnan(values[i, j]):
        ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=8,
                color="white" if values[i, j] < np.nanmean(values) else "black")
  ax.set_xticks(range(len(tasks)), [TASK_COLUMNS.get(t, t) for t in tasks])
  ax.set_yticks(range(len(families)), families)
  ax.set_title(f"{title}: test accuracy (%)", fontsize=10)
  fig.colorbar(image, ax=ax)
  fig.tight_layout()
  return fig


def _plot_curves(workdir: str, manifest: Manifest):
  from effx import metrics  # noqa: PLC0415

  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 5))
  for trial in manifest.trials:
    if not files.exists(os.path.join(workdir, trial.name, "metrics.jsonl")):
      continue
    validation = [p for p in metrics.read(os.path.join(workdir, trial.name))
                  if p.get("split") == "validation"]
    key = "accuracy" if any("accuracy" in p for p in validation) else "cosine"
    points = [(p["step"], 100 * p[key]) for p in validation if key in p]
    if points:
      ax.plot(*zip(*points), marker="o", ms=3, label=f"{trial.name} ({trial.status})")
  ax.set_xlabel("step")
  ax.set_ylabel("validation accuracy (%; encoders: cosine to the teacher x 100)")
  ax.set_title(f"sweep {manifest.sweep or '(default)'}: validation curves", fontsize=10)
  ax.grid(True, alpha=0.3)
  if ax.lines:
    ax.legend(fontsize=7, ncol=2 if len(ax.lines) > 10 else 1)
  fig.tight_layout()
  return fig


def main(argv=None) -> int:
  import argparse  # noqa: PLC0415

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="config file[:arg]")
  parser.add_argument("--workdir", required=True, help="the sweep's folder")
  parser.add_argument("--sweep", default=None, help="NAME runs sweep_NAME of the config")
  parser.add_argument("--parallel", type=int, default=1, help="trials at a time")
  parser.add_argument("--dry-run", action="store_true", help="print the commands only")
  parser.add_argument("--report", action="store_true", help="only rewrite the results")
  parser.add_argument("--launcher", default="local", choices=("local", "slurm", "tpu"))
  parser.add_argument("--check_topology", default="", metavar="TPU",
                      help="compile every trial for this TPU topology (e.g. v5e:4x4) and "
                      "stop; needs libtpu (pip install -e '.[tpu]')")
  slurm = parser.add_argument_group("slurm")
  slurm.add_argument("--nodes", type=int, default=1, help="nodes per trial")
  slurm.add_argument("--gpus_per_node", type=int, default=1)
  slurm.add_argument("--time", default="24:00:00", help="time limit per trial")
  slurm.add_argument("--partition", default="")
  slurm.add_argument("--resubmit", action="store_true",
                     help="submit trials again that an ended job left unfinished")
  pod_args = parser.add_argument_group("tpu (a TPU VM or pod slice; --workdir=gs://...)")
  pod_args.add_argument("--tpu", default="", metavar="NAME", help="the TPU to use or create")
  pod_args.add_argument("--zone", default="")
  pod_args.add_argument("--accelerator", default="", help="e.g. v5litepod-16, v4-32, v6e-8")
  pod_args.add_argument("--project", default="", help="default: gcloud's configured one")
  pod_args.add_argument("--queued", action="store_true",
                        help="create it as a queued resource and wait until it is ACTIVE")
  pod_args.add_argument("--spot", action="store_true", help="create a spot TPU")
  pod_args.add_argument("--runtime_version", default="",
                        help="TPU VM image (default: the generation's)")
  args = parser.parse_args(argv)
  if args.parallel <= 0:
    parser.error(f"--parallel={args.parallel} must be positive")
  if args.nodes <= 0 or args.gpus_per_node < 0:
    parser.error("--nodes must be positive and --gpus_per_node >= 0")
  pod = None
  if args.launcher == "tpu":
    from effx import tpu  # noqa: PLC0415

    pod = cli.user_errors_in_one_line(tpu.Pod)(
        args.tpu, args.zone, args.accelerator, project=args.project, queued=args.queued,
        spot=args.spot, runtime=args.runtime_version)
    if not files.is_remote(args.workdir):
      parser.error(f"--launcher=tpu needs --workdir=gs://BUCKET/...: the workers and this "
                   f"machine must see the same files, and {args.workdir} is a local path")
    if args.parallel != 1:
      parser.error("--launcher=tpu runs one trial at a time on the whole slice: drop "
                   "--parallel")
  if args.launcher == "slurm" and files.is_remote(args.workdir):
    parser.error(f"--launcher=slurm writes job logs beside the workdir: give a folder on the "
                 f"cluster's shared filesystem, not {args.workdir}")
  trials = cli.user_errors_in_one_line(define)(args.config, args.sweep)
  workdir = files.absolute(args.workdir)
  if args.check_topology:
    cli.user_errors_in_one_line(check_topology)(args.config, trials, args.check_topology)
    return 0
  slurm_options = dict(parallel=args.parallel, nodes=args.nodes,
                       gpus_per_node=args.gpus_per_node, time_limit=args.time,
                       partition=args.partition)
  if args.dry_run:
    if args.launcher == "slurm":
      script, commands = slurm_script(args.config, workdir, trials, sweep=args.sweep,
                                      **slurm_options)
      print(f"# {workdir}/slurm/sweep.sbatch\n{script}# {workdir}/slurm/commands.txt\n"
            f"{commands}", end="")
    elif args.launcher == "tpu":
      create, *rest = tpu_plan(args.config, workdir, trials, pod)
      print(f"# unless `{shlex.join(pod.describe())}` finds it:\n{shlex.join(create)}")
      if pod.queued:
        print(f"# then wait until `{shlex.join(pod.state())}` prints ACTIVE")
      print("\n".join(shlex.join(c) for c in rest))
    else:
      for trial in trials:
        print(shlex.join(command(args.config, workdir, trial)))
    return 0
  if not files.is_remote(workdir) and os.path.isfile(workdir):
    parser.error(f"--workdir={workdir} is a file")
  files.makedirs(workdir)
  manifest = cli.user_errors_in_one_line(Manifest)(workdir, args.config, args.sweep, trials)
  refresh(workdir, manifest)
  manifest.save()
  if args.launcher == "slurm" and not args.report:
    answer = cli.user_errors_in_one_line(submit_slurm)(args.config, workdir, manifest,
                                                       resubmit=args.resubmit, **slurm_options)
    print(f"{answer}; rerun with --report for the results so far")
    return 0
  if not args.report:
    waiting = [t.name for t in trials if t.status == "submitted"]
    if waiting:
      parser.error(f"{len(waiting)} trial(s) were submitted to Slurm; run them there, or "
                   "use --report")
    from tqdm import tqdm  # noqa: PLC0415

    finished = sum(t.status == "done" for t in trials)
    with tqdm(total=len(trials), initial=finished, desc="trials", unit="trial") as bar:
      try:
        if pod is not None:
          run_tpu(args.config, workdir, manifest, pod, progress=bar.update)
        else:
          run_local(args.config, workdir, manifest, args.parallel, progress=bar.update)
      except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
      except OSError as error:  # the tpu launcher: no gcloud, or a setup command failed
        print(f"error: {error}", file=sys.stderr)
        return 1
  print("\n".join(report(workdir, manifest)))
  failed = [t.name for t in trials if t.status == "failed"]
  if failed:
    print(f"failed: {', '.join(failed)} (see {workdir}/logs/)", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

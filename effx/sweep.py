"""Sweeps: a grid of runs from one config file, launched on this machine, resumed by
rerunning the same command, read as one table.

  python -m effx.sweep --config=configs/lra_listops.py:small --workdir=/tmp/sweep \\
      --sweep=families [--parallel=2] [--dry-run] [--report]

A config file defines ``sweep(add, arg=None)`` (used without ``--sweep``) or
``sweep_<name>(add, arg=None)`` (``--sweep=<name>``); ``arg`` is the config's ``:arg``.
It calls ``add(**overrides)`` once per trial, keyed by dotted config keys:
``add(**{"model.attention": "local", "learning_rate": 0.01})``. ``product`` and
``zipped`` build grids of such dicts.

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
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Iterable

from effx import cli

RETRIES = 1  # per invocation: a failing trial runs at most 1 + RETRIES times
MANIFEST = "sweep.json"


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
  """A folder name from the overrides: ``attention-local_learning_rate-0.01``."""
  if not overrides:
    return "base"
  last = [k.split(".")[-1] for k in overrides]
  parts = []
  for key, short in zip(overrides, last):
    label = short if last.count(short) == 1 else key
    value = overrides[key]
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
    except (ValueError, TypeError) as error:
      raise type(error)(f"trial {name!r}: {error}") from None
    trials.append(Trial(name, overrides))
  return trials


def trial_config(spec: str, overrides: dict[str, Any]):
  """The config file's config with ``overrides`` set (unknown keys and wrong types raise)."""
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
  return [python, "-m", "effx.train", f"--config={spec}",
          f"--workdir={os.path.join(workdir, trial.name)}",
          *(["--distributed"] if distributed else []),
          *(f"--config.{k}={_text(v)}" for k, v in trial.overrides.items())]


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
    if os.path.exists(self.path):
      with open(self.path, encoding="utf-8") as f:
        stored = json.load(f)
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
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    values = json.load(f)
  keep = ("test_accuracy", "eval_accuracy", "best_step", "step", "wall_time_s",
          "peak_memory_bytes", "num_parameters")
  return {k: values[k] for k in keep if k in values}


def _log_tail(path: str) -> str:
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      lines = [line.strip() for line in f if line.strip()]
  except OSError:
    return ""
  errors = [line for line in lines if line.startswith("error:") or "Error" in line]
  return (errors or lines or [""])[-1][:500]


def run_local(spec: str, workdir: str, manifest: Manifest, parallel: int,
              progress: Callable[[int], None] | None = None) -> None:
  """Runs the manifest's pending trials, ``parallel`` at a time, until each is done or
  has failed ``1 + RETRIES`` times; updates the manifest after every change."""
  slots = _slots(parallel)
  queue = [t for t in manifest.trials if t.status == "pending"]
  running: dict[int, tuple[Trial, subprocess.Popen, Any]] = {}
  tries = {t.name: 0 for t in queue}
  os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)

  def start(slot: int, trial: Trial) -> None:
    tries[trial.name] += 1
    trial.status, trial.attempts = "running", trial.attempts + 1
    log = open(os.path.join(workdir, "logs", f"{trial.name}.log"), "a", encoding="utf-8")
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
        del running[slot]
        results = _read_results(os.path.join(workdir, trial.name))
        if process.returncode == 0 and results is not None:
          trial.status, trial.error, trial.results = "done", "", results
          if progress:
            progress(1)
        elif tries[trial.name] <= RETRIES:
          trial.status = "pending"
          queue.append(trial)
        else:
          trial.status = "failed"
          trial.error = _log_tail(log.name) or f"exit status {process.returncode}"
          if progress:
            progress(1)
        manifest.save()
  except KeyboardInterrupt:
    for trial, process, log in running.values():
      process.send_signal(signal.SIGTERM)  # the trainer checkpoints, then exits
    for trial, process, log in running.values():
      process.wait()
      log.close()
      trial.status = "interrupted"
    manifest.save()
    raise


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
  from effx import workdir as workdir_lib  # noqa: PLC0415

  os.makedirs(os.path.join(workdir, "slurm"), exist_ok=True)
  os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
  for name, text in (("sweep.sbatch", script), ("commands.txt", commands)):
    workdir_lib.write_text_atomic(os.path.join(workdir, "slurm", name), text)
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
  or another invocation)."""
  for trial in manifest.trials:
    if trial.status != "done":
      results = _read_results(os.path.join(workdir, trial.name))
      if results is not None:
        trial.status, trial.error, trial.results = "done", "", results


def report(workdir: str, manifest: Manifest) -> list[str]:
  """Writes ``results.md``, ``results.csv`` and ``curves.png``; returns the table lines."""
  keys = list(dict.fromkeys(k for t in manifest.trials for k in t.overrides))
  rows = []
  for trial in manifest.trials:
    r = trial.results if trial.status == "done" else {}
    steps_per_s = (r["step"] / r["wall_time_s"]) if r.get("wall_time_s") else None
    rows.append({"trial": trial.name, **{k: trial.overrides.get(k, "") for k in keys},
                 "status": trial.status,
                 "test_accuracy": r.get("test_accuracy"), "eval_accuracy": r.get("eval_accuracy"),
                 "best_step": r.get("best_step"), "steps_per_s": steps_per_s,
                 "peak_memory_mb": (r["peak_memory_bytes"] / 2**20
                                    if r.get("peak_memory_bytes") else None),
                 "error": trial.error})
  columns = list(rows[0])
  with open(os.path.join(workdir, "results.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
  shown = ["trial", *keys, "status", "test_accuracy", "eval_accuracy", "steps_per_s",
           "peak_memory_mb"]
  lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
  for row in rows:
    cells = []
    for k in shown:
      v = row[k]
      if k in ("test_accuracy", "eval_accuracy"):
        v = "" if v is None else f"{100 * v:.1f}%"
      elif k in ("steps_per_s", "peak_memory_mb"):
        v = "" if v is None else f"{v:.1f}"
      cells.append(str(v))
    lines.append("| " + " | ".join(cells) + " |")
  done = [r for r in rows if r["status"] == "done"]
  if done:
    mean = sum(r["test_accuracy"] for r in done) / len(done)
    lines.append(f"\nMean test accuracy over the {len(done)} finished of {len(rows)} trials: "
                 f"{100 * mean:.2f}%.")
  with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
    f.write(f"Sweep {manifest.sweep or '(default)'} of `{manifest.spec}`\n\n")
    f.write("\n".join(lines) + "\n")
  _plot_curves(workdir, manifest)
  return lines


def _plot_curves(workdir: str, manifest: Manifest) -> None:
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(8, 5))
  for trial in manifest.trials:
    path = os.path.join(workdir, trial.name, "metrics.jsonl")
    if not os.path.exists(path):
      continue
    with open(path, encoding="utf-8") as f:
      points = [json.loads(line) for line in f if line.strip()]
    points = [(p["step"], 100 * p["accuracy"]) for p in points
              if p.get("split") == "validation" and "accuracy" in p]
    if points:
      ax.plot(*zip(*points), marker="o", ms=3, label=f"{trial.name} ({trial.status})")
  ax.set_xlabel("step")
  ax.set_ylabel("validation accuracy (%)")
  ax.set_title(f"sweep {manifest.sweep or '(default)'}: validation curves", fontsize=10)
  ax.grid(True, alpha=0.3)
  if ax.lines:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "curves.png"), dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  import argparse  # noqa: PLC0415

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="config file[:arg]")
  parser.add_argument("--workdir", required=True, help="the sweep's folder")
  parser.add_argument("--sweep", default=None, help="NAME runs sweep_NAME of the config")
  parser.add_argument("--parallel", type=int, default=1, help="trials at a time")
  parser.add_argument("--dry-run", action="store_true", help="print the commands only")
  parser.add_argument("--report", action="store_true", help="only rewrite the results")
  parser.add_argument("--launcher", default="local", choices=("local", "slurm"))
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
  args = parser.parse_args(argv)
  if args.parallel <= 0:
    parser.error(f"--parallel={args.parallel} must be positive")
  if args.nodes <= 0 or args.gpus_per_node < 0:
    parser.error("--nodes must be positive and --gpus_per_node >= 0")
  trials = cli.user_errors_in_one_line(define)(args.config, args.sweep)
  workdir = os.path.abspath(args.workdir)
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
    else:
      for trial in trials:
        print(shlex.join(command(args.config, workdir, trial)))
    return 0
  if os.path.isfile(workdir):
    parser.error(f"--workdir={workdir} is a file")
  os.makedirs(workdir, exist_ok=True)
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
        run_local(args.config, workdir, manifest, args.parallel, progress=bar.update)
      except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
  print("\n".join(report(workdir, manifest)))
  failed = [t.name for t in trials if t.status == "failed"]
  if failed:
    print(f"failed: {', '.join(failed)} (see {workdir}/logs/)", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

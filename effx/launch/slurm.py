"""The Slurm launcher: the unfinished trials as one job array (``sbatch``), multi-node
trials with ``--distributed``; results read as they arrive."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

from effx.common import files
from effx.launch.manifest import Manifest
from effx.launch.trials import Trial, command


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


def search_script(worker: list[str], workdir: str, *, parallel: int, nodes: int,
                  gpus_per_node: int, time_limit: str, partition: str, search: str) -> str:
  """An sbatch script of ``parallel`` array tasks, each one search worker (``worker``:
  its ``effx.sweep ... --worker`` command) that asks the study for trials until the
  search has its number of trials."""
  if nodes != 1:
    raise ValueError(f"--nodes={nodes}: a search worker trains its trials on one node; "
                     "multi-node trials are not supported by --search")
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name=effx-search-{search}",
           f"#SBATCH --array=0-{parallel - 1}",
           "#SBATCH --nodes=1",
           "#SBATCH --ntasks-per-node=1",
           *([f"#SBATCH --gpus-per-node={gpus_per_node}"] if gpus_per_node else []),
           f"#SBATCH --time={time_limit}",
           *([f"#SBATCH --partition={partition}"] if partition else []),
           f"#SBATCH --output={os.path.join(workdir, 'logs', 'slurm-%A_%a.log')}",
           "set -euo pipefail",
           f"cd {shlex.quote(os.getcwd())}",
           "# Every task is one worker of the same study: the database hands out each trial",
           "# once; a task that ends early (time limit) leaves its trial to the others.",
           shlex.join(worker)]
  return "\n".join(lines) + "\n"


def submit_search(script: str, workdir: str) -> str:
  """Writes ``<workdir>/slurm/search.sbatch`` and submits it; returns sbatch's answer."""
  files.makedirs(os.path.join(workdir, "slurm"))
  files.makedirs(os.path.join(workdir, "logs"))
  path = os.path.join(workdir, "slurm", "search.sbatch")
  files.write_text_atomic(path, script)
  if shutil.which("sbatch") is None:
    raise FileNotFoundError(f"sbatch not found: the job script is {path}; submit it where "
                            "Slurm runs (sbatch <script>)")
  return subprocess.run(["sbatch", path], capture_output=True, text=True,
                        check=True).stdout.strip()

"""Running a sweep's trials on a Cloud TPU VM or pod slice with ``gcloud``.

``python -m effx.sweep ... --launcher=tpu --tpu=NAME --zone=ZONE
--accelerator=v5litepod-16 [--queued] [--spot] --workdir=gs://BUCKET/sweep``:

1. creates the TPU (``tpu-vm create``, or a queued resource with ``--queued``, waited for
   until it is ACTIVE) unless ``tpu-vm describe`` finds it;
2. packs this checkout (``pyproject.toml``, ``README.md``, ``effx/``, ``configs/`` and the
   sweep's config file), copies it to every worker (``tpu-vm scp --worker=all``) and
   installs it there (``pip install -e '.[tpu]'``);
3. runs each unfinished trial on all workers at once (``tpu-vm ssh --worker=all``) as
   ``python3 -m effx.train --distributed ...``: every worker is one JAX process and
   ``jax.distributed.initialize()`` finds the others from the TPU's metadata.

The workdir must be a bucket that the workers and this machine both reach: checkpoints go
there through orbax, metrics, results and the sweep's manifest through ``effx.common.files``.
Trials run one after another, each on the whole slice; the sweep's resume, retry and
report are the local launcher's. The TPU is left running at the end (``gcloud compute
tpus tpu-vm delete NAME --zone=ZONE`` deletes it).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import time
from typing import Callable

from effx.launch.manifest import Manifest, keep_log, local_log, settle, stage
from effx.launch.trials import Trial, command, trial_spec

# Runtime images per TPU generation (cloud.google.com/tpu/docs/runtimes).
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
            "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKED = ("pyproject.toml", "README.md", "effx", "configs")
REMOTE_DIR = "effx"  # the checkout's folder in each worker's home
ARCHIVE = "effx.tar.gz"


@dataclasses.dataclass(frozen=True)
class Pod:
  """A TPU VM or pod slice: ``accelerator`` is gcloud's type (``v5litepod-16``,
  ``v4-32``, ``v6e-8``); ``runtime`` defaults to the generation's image."""

  name: str
  zone: str
  accelerator: str
  project: str = ""
  queued: bool = False
  spot: bool = False
  runtime: str = ""

  def __post_init__(self):
    if not self.name or not self.zone or not self.accelerator:
      raise ValueError("--launcher=tpu needs --tpu=NAME, --zone=ZONE and --accelerator=TYPE "
                       "(the TPU to use, or create when it does not exist: e.g. "
                       "--tpu=effx-sweep --zone=us-west4-a --accelerator=v5litepod-16)")
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", self.accelerator)
    if not match:
      raise ValueError(f"--accelerator={self.accelerator!r} is not a TPU type gcloud takes: "
                       "write <generation>-<cores or chips>, e.g. v5litepod-16, v4-32, v6e-8")
    if not self.runtime and match.group(1) not in RUNTIMES:
      raise ValueError(f"--accelerator={self.accelerator}: no default runtime image for "
                       f"{match.group(1)} (known: {', '.join(RUNTIMES)}); pass "
                       "--runtime_version")

  @property
  def runtime_version(self) -> str:
    return self.runtime or RUNTIMES[self.accelerator.rsplit("-", 1)[0]]

  def _gcloud(self, *args: str) -> list[str]:
    return ["gcloud", "compute", "tpus", *args, f"--zone={self.zone}",
            *([f"--project={self.project}"] if self.project else [])]

  def describe(self) -> list[str]:
    """Succeeds when the TPU exists."""
    return self._gcloud("tpu-vm", "describe", self.name)

  def create(self) -> list[str]:
    """The command that creates the TPU (queued: a queued resource, ACTIVE once granted)."""
    spot = ["--spot"] if self.spot else []
    if not self.queued:
      return self._gcloud("tpu-vm", "create", self.name,
                          f"--accelerator-type={self.accelerator}",
                          f"--version={self.runtime_version}", *spot)
    return self._gcloud("queued-resources", "create", self.name, f"--node-id={self.name}",
                        f"--accelerator-type={self.accelerator}",
                        f"--runtime-version={self.runtime_version}", *spot)

  def state(self) -> list[str]:
    """Prints the queued resource's state (WAITING_FOR_RESOURCES, ACTIVE, FAILED ...)."""
    return self._gcloud("queued-resources", "describe", self.name,
                        "--format=value(state.state)")

  def copy(self, archive: str) -> list[str]:
    return self._gcloud("tpu-vm", "scp", archive, f"{self.name}:{ARCHIVE}", "--worker=all")

  def ssh(self, remote_command: str) -> list[str]:
    """``remote_command`` run on every worker at once."""
    return self._gcloud("tpu-vm", "ssh", self.name, "--worker=all",
                        "--command", remote_command)


def remote_spec(spec: str) -> str:
  """The sweep's ``--config`` as the workers see it: relative to the checkout, or, for a
  config file outside it, the file packed at the checkout's top."""
  path, colon, arg = spec.partition(":")
  path = os.path.abspath(path)
  inside = os.path.relpath(path, ROOT)
  name = inside if not inside.startswith("..") else os.path.basename(path)
  return name + colon + arg


def pack(specs: list[str], archive: str) -> list[str]:
  """The ``tar`` command packing the checkout and the config files outside it."""
  outside = []
  for spec in dict.fromkeys(specs):
    path = os.path.abspath(spec.partition(":")[0])
    if os.path.relpath(path, ROOT).startswith(".."):
      outside += ["-C", os.path.dirname(path), os.path.basename(path)]
  return ["tar", "czf", archive, "--exclude=__pycache__", "-C", ROOT, *PACKED, *outside]


def install() -> str:
  """Run on every worker: unpack the checkout into ``~/effx`` and install it."""
  return (f"rm -rf {REMOTE_DIR} && mkdir {REMOTE_DIR} && tar xzf {ARCHIVE} -C {REMOTE_DIR} "
          f"&& cd {REMOTE_DIR} && python3 -m pip install -q -e .[tpu]")


def worker_command(train_command: list[str]) -> str:
  """Run on every worker: one trial's ``effx.train`` command (made on this machine) from
  the installed checkout, its ``--config`` as the workers see it."""
  train_command = [f"--config={remote_spec(a[len('--config='):])}"
                   if a.startswith("--config=") else a for a in train_command]
  return f"cd {REMOTE_DIR} && {shlex.join(train_command)}"


def setup(pod: Pod, specs: list[str], archive: str) -> list[list[str]]:
  """The commands that put this checkout (and the config files ``specs`` outside it) on
  every worker, in order, once the TPU is up."""
  return [pack(specs, archive), pod.copy(archive), pod.ssh(install())]


def tpu_plan(spec: str, workdir: str, trials: list[Trial], pod) -> list[list[str]]:
  """Every command the ``tpu`` launcher runs for ``trials``, in order (creation first,
  done only when ``pod.describe()`` fails; with ``--queued``, then waiting until the
  queued resource is ACTIVE)."""
  archive = os.path.join(stage(workdir), ARCHIVE)
  specs = [spec, *(trial_spec(spec, t.overrides)[0] for t in trials)]
  return [pod.create(), *setup(pod, specs, archive),
          *(pod.ssh(worker_command(command(spec, workdir, t, python="python3",
                                               distributed=True)))
            for t in trials)]


def _checked(cmd: list[str]) -> None:
  """Runs a setup command; its failure is one message naming it."""
  if subprocess.run(cmd).returncode != 0:
    raise OSError(f"this failed (its output is above): {shlex.join(cmd)}")


def run_tpu(spec: str, workdir: str, manifest: Manifest, pod,
            progress: Callable[[int], None] | None = None) -> None:
  """Runs the manifest's pending trials one after another on every worker of ``pod``
  (an ``effx.launch.tpu.Pod``), creating it first when it does not exist."""
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
  os.makedirs(stage(workdir), exist_ok=True)
  for step in setup_commands:
    _checked(step)
  queue, tries = list(pending), {t.name: 0 for t in pending}
  while queue:
    trial = queue.pop(0)
    tries[trial.name] += 1
    trial.status, trial.attempts = "running", trial.attempts + 1
    manifest.save()
    remote = worker_command(command(spec, workdir, trial, python="python3",
                                        distributed=True))
    with open(local_log(workdir, trial), "a", encoding="utf-8") as log:
      try:
        returncode = subprocess.run(pod.ssh(remote), stdout=log,
                                    stderr=subprocess.STDOUT).returncode
      except KeyboardInterrupt:
        trial.status = "interrupted"  # resumes from its last checkpoint on the rerun
        manifest.save()
        raise
      finally:
        log.close()
        keep_log(workdir, trial)
    if settle(workdir, trial, returncode, local_log(workdir, trial), tries[trial.name],
               progress):
      queue.append(trial)
    manifest.save()

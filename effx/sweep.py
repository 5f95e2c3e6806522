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
``--distributed`` (``effx.launch.tpu``). Workdirs may be buckets with any launcher
(``effx.common.files``).

Search (``--search=NAME --trials=N``): instead of a grid, an Optuna study over the
config file's ``search_<name>(trial, arg=None)``, which returns a trial's overrides from
``trial.suggest_*`` (``effx.launch.search``)::

  python -m effx.sweep --config=configs/distill_listops.py:small --workdir=/tmp/kd \\
      --search=kd --trials=20 [--parallel=2] [--storage=postgresql+psycopg://...] \\
      [--sampler=tpe|random|cmaes|grid] [--pruner=median|hyperband|threshold|none]

Each trial trains in ``<workdir>/trial-NNNN``; the study is in ``<workdir>/study.db``
(SQLite) unless ``--storage`` names a database; ``results.md`` shows the best trial,
every trial and Optuna's plots. More workers join the same study with ``--worker``
(other hosts, with a database server) or as Slurm array tasks (``--launcher=slurm``).

Local launcher: each trial is a ``python -m effx.train`` subprocess, ``--parallel`` at a
time; with GPUs (``nvidia-smi -L``) each trial gets one through ``CUDA_VISIBLE_DEVICES``,
otherwise the CPU cores are split between the running trials (CPU affinity). Logs go to
``<workdir>/logs/<name>.log``. At the end (or with ``--report``) ``results.md`` and
``results.csv`` give each trial's best-on-validation test accuracy, validation accuracy,
steps per second and peak memory, and ``curves.png`` the validation curves; trials that
have not finished show their status, never numbers.
"""

from __future__ import annotations

import shlex
import sys

from absl import flags

from effx import cli
from effx.launch.trials import product, zipped  # noqa: F401 (config files' sweep helpers)

FLAGS = flags.FLAGS
LAUNCHERS = ("local", "slurm", "tpu")


def define_flags() -> None:
  flags.DEFINE_string("config", None, "config file[:arg]", required=True)
  flags.DEFINE_string("workdir", None, "the sweep's folder", required=True)
  flags.DEFINE_string("sweep", None, "NAME runs sweep_NAME of the config")
  flags.DEFINE_integer("parallel", 1, "trials at a time", lower_bound=1)
  flags.DEFINE_bool("dry-run", False, "print the commands only")
  flags.DEFINE_bool("report", False, "only rewrite the results")
  flags.DEFINE_enum("launcher", "local", list(LAUNCHERS), "where the trials run")
  flags.DEFINE_string("check_topology", "", "compile every trial for this TPU topology "
                      "(e.g. v5e:4x4) and stop; needs libtpu (pip install -e '.[tpu]')")
  # search
  flags.DEFINE_string("search", None, "NAME runs an Optuna study over search_NAME of the "
                      "config instead of a grid")
  flags.DEFINE_integer("trials", None, "search: trials to run (complete, pruned or failed)")
  flags.DEFINE_string("storage", "", "search: the study's database (an SQLAlchemy URL); "
                      "default sqlite:///<workdir>/study.db")
  flags.DEFINE_string("sampler", "tpe", "search: tpe, random, cmaes or grid")
  flags.DEFINE_integer("sampler_seed", 0, "search: the sampler's seed (--worker processes "
                       "add their pid)")
  flags.DEFINE_string("pruner", "median", "search: median, hyperband, threshold or none")
  flags.DEFINE_integer("pruner_startup_trials", 5, "search, median pruner: trials that end "
                       "before any is pruned", lower_bound=0)
  flags.DEFINE_integer("pruner_warmup_steps", 0, "search, median/threshold pruner: training "
                       "steps before a trial can be pruned", lower_bound=0)
  flags.DEFINE_float("prune_threshold", None, "search, threshold pruner: stop a trial whose "
                     "validation value is worse than this")
  flags.DEFINE_string("direction", "auto", "search: maximize, minimize, or auto (from the "
                      "metric: accuracy and cosine up, bits per byte down)")
  flags.DEFINE_integer("heartbeat", 60, "search: seconds between a worker's heartbeats; a "
                       "trial silent for two of them is taken as its worker's death")
  flags.DEFINE_bool("worker", False, "search: join the study as one more worker (Slurm "
                    "tasks, other hosts): no folder lock, no report")
  # slurm
  flags.DEFINE_integer("nodes", 1, "slurm: nodes per trial", lower_bound=1)
  flags.DEFINE_integer("gpus_per_node", 1, "slurm: GPUs per node", lower_bound=0)
  flags.DEFINE_string("time", "24:00:00", "slurm: time limit per trial")
  flags.DEFINE_string("partition", "", "slurm: partition")
  flags.DEFINE_bool("resubmit", False, "slurm: submit trials again that an ended job left "
                    "unfinished")
  # tpu (a TPU VM or pod slice; --workdir=gs://...)
  flags.DEFINE_string("tpu", "", "tpu: the TPU to use or create")
  flags.DEFINE_string("zone", "", "tpu: its zone")
  flags.DEFINE_string("accelerator", "", "tpu: e.g. v5litepod-16, v4-32, v6e-8")
  flags.DEFINE_string("project", "", "tpu: default: gcloud's configured one")
  flags.DEFINE_bool("queued", False, "tpu: create it as a queued resource and wait until it "
                    "is ACTIVE")
  flags.DEFINE_bool("spot", False, "tpu: create a spot TPU")
  flags.DEFINE_string("runtime_version", "", "tpu: TPU VM image (default: the "
                      "generation's)")


def main(overrides=()) -> int:
  # The launchers import jax (through the trials' config checks): not needed by --help.
  from effx.common import files  # noqa: PLC0415 (see above)
  from effx.common import lock  # noqa: PLC0415 (idem)
  from effx.launch import slurm, tpu, trials  # noqa: PLC0415 (idem)

  spec, workdir = FLAGS.config, FLAGS.workdir
  if FLAGS.search:
    return _search(spec, workdir, overrides)
  if overrides:
    raise ValueError(f"--config.{overrides[0][0]}: overrides on the command line are set in "
                     "every trial of a search (--search); a grid sweep sets its values in "
                     "its sweep function (add(...))")
  if FLAGS.worker or FLAGS.trials is not None:
    raise ValueError(f"--{'worker' if FLAGS.worker else 'trials'} belongs to a search: add "
                     "--search=NAME")
  pod = None
  if FLAGS.launcher == "tpu":
    pod = tpu.Pod(FLAGS.tpu, FLAGS.zone, FLAGS.accelerator, project=FLAGS.project,
                  queued=FLAGS.queued, spot=FLAGS.spot, runtime=FLAGS.runtime_version)
    if not files.is_remote(workdir):
      raise ValueError(f"--launcher=tpu needs --workdir=gs://BUCKET/...: the workers and "
                       f"this machine must see the same files, and {workdir} is a local path")
    if FLAGS.parallel != 1:
      raise ValueError("--launcher=tpu runs one trial at a time on the whole slice: drop "
                       "--parallel")
  if FLAGS.launcher == "slurm" and files.is_remote(workdir):
    raise ValueError(f"--launcher=slurm writes job logs beside the workdir: give a folder on "
                     f"the cluster's shared filesystem, not {workdir}")
  defined = trials.define(spec, FLAGS.sweep)
  workdir = files.absolute(workdir)
  if FLAGS.check_topology:
    trials.check_topology(spec, defined, FLAGS.check_topology)
    return 0
  slurm_options = dict(parallel=FLAGS.parallel, nodes=FLAGS.nodes,
                       gpus_per_node=FLAGS.gpus_per_node, time_limit=FLAGS.time,
                       partition=FLAGS.partition)
  if FLAGS["dry-run"].value:
    if FLAGS.launcher == "slurm":
      script, commands = slurm.slurm_script(spec, workdir, defined, sweep=FLAGS.sweep,
                                            **slurm_options)
      print(f"# {workdir}/slurm/sweep.sbatch\n{script}# {workdir}/slurm/commands.txt\n"
            f"{commands}", end="")
    elif FLAGS.launcher == "tpu":
      create, *rest = tpu.tpu_plan(spec, workdir, defined, pod)
      print(f"# unless `{shlex.join(pod.describe())}` finds it:\n{shlex.join(create)}")
      if pod.queued:
        print(f"# then wait until `{shlex.join(pod.state())}` prints ACTIVE")
      print("\n".join(shlex.join(c) for c in rest))
    else:
      for trial in defined:
        print(shlex.join(trials.command(spec, workdir, trial)))
    return 0
  if not files.is_remote(workdir) and files.exists(workdir) and not files.isdir(workdir):
    raise NotADirectoryError(f"--workdir={workdir} is a file")
  if FLAGS.report:  # reads the trials (and rewrites the report) beside a running sweep
    return _launch(spec, workdir, defined, pod, slurm_options)
  # One sweep process per sweep folder (its trials lock their own workdirs).
  with lock.workdir_lock(workdir, "effx.sweep"):
    return _launch(spec, workdir, defined, pod, slurm_options)


def _launch(spec, workdir, defined, pod, slurm_options) -> int:
  from effx.common import files  # noqa: PLC0415 (see main)
  from effx.launch import local, manifest, report, slurm, tpu  # noqa: PLC0415 (idem)

  files.makedirs(workdir)
  record = manifest.Manifest(workdir, spec, FLAGS.sweep, defined)
  manifest.refresh(workdir, record)
  record.save()
  if FLAGS.launcher == "slurm" and not FLAGS.report:
    answer = slurm.submit_slurm(spec, workdir, record, resubmit=FLAGS.resubmit,
                                **slurm_options)
    print(f"{answer}; rerun with --report for the results so far")
    return 0
  if not FLAGS.report:
    waiting = [t.name for t in defined if t.status == "submitted"]
    if waiting:
      raise ValueError(f"{len(waiting)} trial(s) were submitted to Slurm; run them there, "
                       "or use --report")
    from tqdm import tqdm  # noqa: PLC0415 (with the launchers)

    finished = sum(t.status == "done" for t in defined)
    with tqdm(total=len(defined), initial=finished, desc="trials", unit="trial") as bar:
      try:
        if pod is not None:
          tpu.run_tpu(spec, workdir, record, pod, progress=bar.update)
        else:
          local.run_local(spec, workdir, record, FLAGS.parallel, progress=bar.update)
      except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
  print("\n".join(report.report(workdir, record)))
  failed = [t.name for t in defined if t.status == "failed"]
  if failed:
    print(f"failed: {', '.join(failed)} (see {workdir}/logs/)", file=sys.stderr)
  return 1 if failed else 0


def _search(spec: str, workdir: str, overrides) -> int:
  """``--search``: check, then work on the study (or submit workers, or report)."""
  import json  # noqa: PLC0415 (with the launchers)
  import os  # noqa: PLC0415 (idem)

  from effx.common import files  # noqa: PLC0415 (see main)
  from effx.common import lock  # noqa: PLC0415 (idem)
  from effx.launch import search, search_report, slurm  # noqa: PLC0415 (idem)

  if FLAGS.sweep:
    raise ValueError(f"--sweep={FLAGS.sweep} and --search={FLAGS.search}: a grid or a "
                     "search, not both")
  if FLAGS.launcher == "tpu":
    raise ValueError("--search runs with --launcher=local or slurm; the TPU launcher runs "
                     "grids only")
  if files.is_remote(workdir):
    raise ValueError(f"--search needs a local (or shared) folder for its study and logs, "
                     f"not {workdir}")
  several = FLAGS.worker or FLAGS.launcher == "slurm"  # worker processes on one study
  if several and not FLAGS.report and (not FLAGS.storage or
                                      FLAGS.storage.startswith("sqlite")):
    raise ValueError(f"{'--worker' if FLAGS.worker else '--launcher=slurm'}: several worker "
                     "processes share one study through a database server (--storage="
                     "postgresql+psycopg://USER@HOST/DB): SQLite cannot hand each trial to "
                     "exactly one of them (in one process, --parallel runs trials at once)")
  if several and search.has_password(FLAGS.storage or ""):
    raise ValueError("--storage holds a password, which the workers' command lines (and the "
                     "Slurm script) would show: keep it in ~/.pgpass or PGPASSWORD instead")
  options = search.Options(
      spec=spec, name=FLAGS.search, trials=FLAGS.trials if not FLAGS.report else
      (FLAGS.trials or 1), storage=FLAGS.storage,
      sampler=FLAGS.sampler, pruner=FLAGS.pruner, direction=FLAGS.direction,
      # Workers sample apart (except a grid, whose order must agree everywhere).
      seed=FLAGS.sampler_seed + (os.getpid() if FLAGS.worker and FLAGS.sampler != "grid"
                                 else 0),
      concurrent=FLAGS.parallel > 1 or several,
      startup_trials=FLAGS.pruner_startup_trials, warmup_steps=FLAGS.pruner_warmup_steps,
      threshold=FLAGS.prune_threshold, heartbeat=FLAGS.heartbeat,
      base={key: cli.parse_value(text) for key, text in overrides})
  search.check_options(options)
  workdir = files.absolute(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir={workdir} is a file")
  if FLAGS.report:  # what the folder's search.json records, whatever the flags say
    path = os.path.join(workdir, search.RECORD)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{workdir} holds no search yet ({search.RECORD})")
    stored = json.loads(files.read_text(path))
    study = search.open_study(options, workdir, stored["direction"])
    print("\n".join(search_report.report(workdir, study, stored)))
    return 0
  metric, direction = search.selection(spec, options.name, options.base)  # a sampled trial
  if options.direction != "auto":
    direction = options.direction
  worker = [sys.executable if FLAGS.launcher == "local" else "python", "-m", "effx.sweep",
            f"--config={spec}", f"--workdir={workdir}", f"--search={options.name}",
            f"--trials={options.trials}", f"--sampler={options.sampler}",
            f"--sampler_seed={FLAGS.sampler_seed}", f"--pruner={options.pruner}",
            f"--pruner_startup_trials={options.startup_trials}",
            f"--pruner_warmup_steps={options.warmup_steps}",
            *([f"--prune_threshold={options.threshold}"] if options.threshold is not None
              else []),
            f"--direction={direction}", f"--heartbeat={options.heartbeat}",
            *([f"--storage={options.storage}"] if options.storage else []),
            *(f"--config.{key}={text}" for key, text in overrides),
            *([f"--parallel={max(1, FLAGS.gpus_per_node)}"] if FLAGS.launcher == "slurm"
              else []), "--worker"]
  slurm_options = dict(parallel=FLAGS.parallel, nodes=FLAGS.nodes,
                       gpus_per_node=FLAGS.gpus_per_node, time_limit=FLAGS.time,
                       partition=FLAGS.partition, search=options.name)
  if FLAGS["dry-run"].value:
    if FLAGS.launcher == "slurm":
      print(f"# {workdir}/slurm/search.sbatch")
      print(slurm.search_script(worker, workdir, **slurm_options), end="")
    else:
      print(shlex.join(worker[:-1] + ([f"--parallel={FLAGS.parallel}"]
                                      if FLAGS.parallel > 1 else [])))
    return 0

  if options.storage:  # an unreachable database: one message before anything is written
    search.open_study(options, workdir, direction)

  def work() -> int:
    from tqdm import tqdm  # noqa: PLC0415 (with the launchers)

    files.makedirs(workdir)
    stored = search.record(options, workdir, metric, direction)
    study = search.open_study(options, workdir, direction)  # made once, before workers
    if FLAGS.launcher == "slurm":
      script = slurm.search_script(worker, workdir, **slurm_options)
      print(f"{slurm.submit_search(script, workdir)}; rerun with --report for the study "
            "so far")
      return 0
    ended = search.tally(study)["ended"]
    with tqdm(total=options.trials, initial=min(ended, options.trials), desc="trials",
              unit="trial") as bar:
      try:
        search.work(options, workdir, metric, direction, parallel=FLAGS.parallel,
                    progress=bar.update)
      except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue the study", file=sys.stderr)
        return 130
    if FLAGS.worker:
      return 0
    lines = search_report.report(workdir, study, stored)
    print("\n".join(lines))
    if not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
      print(f"no trial completed (see {workdir}/logs/)", file=sys.stderr)
      return 1
    return 0

  if FLAGS.worker:  # several workers share the folder: each trial locks its own
    return work()
  with lock.workdir_lock(workdir, "effx.sweep --search"):
    return work()


def run(argv=None) -> int:
  """Runs the sweep command on ``argv`` (the arguments after the program name; default:
  the command line) and returns its exit status."""
  return cli.run(define_flags, main, argv, overrides=True)


if __name__ == "__main__":
  sys.exit(run())

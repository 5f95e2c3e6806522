"""Hyperparameter search: an Optuna study whose trials are ``effx.train`` runs.

A config file defines ``search_<name>(trial, arg=None)`` beside its sweeps: it asks
Optuna's ``trial.suggest_float / suggest_int / suggest_categorical`` for values and
returns the trial's overrides, keyed by dotted config keys as in sweeps::

  def search_lr(trial, arg=None):
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)}

Each trial trains in ``<workdir>/trial-NNNN`` as an ordinary ``python -m effx.train``
subprocess. Its objective is the run's best validation value of the metric that picks
its best checkpoint (accuracy, bits per byte, or for distilled encoders the cosine to
the teacher; the direction follows it). Every evaluation is reported to the study; a
trial the pruner stops gets SIGTERM, checkpoints and exits, and is recorded as pruned
with its last value (its workdir stays, and resumes like any run).

The study lives in a database: by default ``<workdir>/study.db`` (SQLite), or any
SQLAlchemy URL (``postgresql+psycopg://user@host/db`` for workers on many hosts). A
worker asks the study for trials until ``--trials`` have ended (complete, pruned or
failed), so several workers (``--parallel`` trials in one worker, Slurm array tasks,
``--worker`` processes on other hosts) share one study and never run a trial twice: the
database hands each trial out once. Rerunning the command continues the study. A trial
interrupted by Ctrl-C, or left RUNNING by a worker that died (its heartbeat stops), is
marked failed and queued again with its own parameters and workdir, so it resumes from
its checkpoints (Optuna's ``RetryHeartbeatStaleTrialCallback``): nothing is sampled
again, nothing is lost.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import time
import warnings
from typing import Any, Callable

from effx import cli
from effx.common import files
from effx.launch import manifest as manifest_lib
from effx.launch import trials as trials_lib

SAMPLERS = ("tpe", "random", "cmaes", "grid")
PRUNERS = ("median", "hyperband", "threshold", "none")
DIRECTIONS = ("auto", "maximize", "minimize")
DATABASE = "study.db"
RECORD = "search.json"
# An interrupted or stale trial is queued again however often that happens: each time
# it resumes from its own checkpoints, so a retry costs no work.
_UNLIMITED = None


@dataclasses.dataclass
class Options:
  """A search as the command line gives it (see ``effx.sweep``)."""

  spec: str                   # config file[:arg]
  name: str                   # search_<name> of the config file
  trials: int                 # trials to end (complete, pruned or failed)
  storage: str = ""           # SQLAlchemy URL; "" = sqlite:///<workdir>/study.db
  sampler: str = "tpe"
  pruner: str = "median"
  direction: str = "auto"
  seed: int = 0               # the sampler's
  startup_trials: int = 5     # median: trials that end before any is pruned
  warmup_steps: int = 0       # median: training steps before a trial can be pruned
  threshold: float | None = None  # threshold: prune below (maximize) / above this value
  heartbeat: int = 60         # seconds; a RUNNING trial silent for 2 of these is stale
  concurrent: bool = False    # trials run at once (--parallel > 1, several workers)
  # --config.KEY=VALUE of the command: set in every trial (the search's own keys win).
  base: dict[str, Any] = dataclasses.field(default_factory=dict)


def check_options(options: Options) -> None:
  """One message for a bad flag value, before anything is read or written."""
  if options.trials is None or options.trials <= 0:
    raise ValueError(f"--trials={options.trials}: a search needs the number of trials to "
                     "run, a positive integer (e.g. --trials=20)")
  for flag, value, valid in (("sampler", options.sampler, SAMPLERS),
                             ("pruner", options.pruner, PRUNERS),
                             ("direction", options.direction, DIRECTIONS)):
    if value not in valid:
      raise ValueError(f"--{flag}={value!r}: one of {', '.join(valid)}")
  if options.pruner == "threshold" and options.threshold is None:
    raise ValueError("--pruner=threshold needs --prune_threshold=VALUE (a trial whose "
                     "validation value is worse than it is stopped)")
  if options.pruner != "threshold" and options.threshold is not None:
    raise ValueError(f"--prune_threshold={options.threshold} is read by --pruner=threshold "
                     f"only, not --pruner={options.pruner}")
  if options.heartbeat < 1:
    raise ValueError(f"--heartbeat={options.heartbeat}: seconds between a worker's "
                     "heartbeats, at least 1")


# --- The search function ---------------------------------------------------------------

def search_function(spec: str, name: str) -> tuple[Callable, str | None]:
  """``(search_<name>, arg)`` of the config file in ``spec``; one message listing the
  file's searches when it defines none of that name."""
  module, arg = cli.load_module(spec)
  function = getattr(module, f"search_{name}", None)
  if not callable(function):
    available = sorted(n[len("search_"):] for n in dir(module) if n.startswith("search_"))
    raise ValueError(f"--search={name}: {spec.partition(':')[0]} defines no "
                     f"search_{name}(trial, arg=None); searches there: "
                     f"{', '.join(available) or 'none'}")
  return function, arg


def overrides_of(spec: str, name: str, trial, base: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
  """``base`` and the overrides ``search_<name>`` returns for ``trial``, checked as
  ``effx.train`` checks a config (unknown keys, wrong types, the whole config): one
  message naming the trial's parameters otherwise."""
  from effx.training import validate  # noqa: PLC0415 (jax: not needed for --help)

  function, arg = search_function(spec, name)
  overrides = function(trial, arg)
  if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
    raise TypeError(f"search_{name}() returned {type(overrides).__name__}: it returns the "
                    "trial's overrides, a dict of dotted config keys to values")
  overrides = {**(base or {}), **overrides}
  try:
    validate.config(trials_lib.trial_config(spec, overrides))
  except (ValueError, TypeError, OSError) as error:
    raise type(error)(f"search_{name}() with {trial.params}: {error}") from None
  return overrides


def selection(spec: str, name: str, base: dict[str, Any] | None = None) -> tuple[str, str]:
  """``(metric, direction)`` of the search: the metric that picks a run's best
  checkpoint, from a sampled trial's config (every trial of a search must agree)."""
  import optuna  # noqa: PLC0415 (with the search)

  from effx.training import objectives  # noqa: PLC0415 (jax)

  optuna.logging.set_verbosity(optuna.logging.WARNING)
  trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
  config = trials_lib.trial_config(spec, overrides_of(spec, name, trial, base))
  metric, higher = objectives.selection_metric(config)
  return metric, "maximize" if higher else "minimize"


class _GridRecorder:
  """Stands in for a trial to read the grid a search function spans (``--sampler=grid``):
  every ``suggest_*`` call records its values and returns the first."""

  def __init__(self):
    self.space: dict[str, list] = {}
    self.params: dict[str, Any] = {}

  def suggest_categorical(self, name, choices):
    return self._add(name, list(choices))

  def suggest_int(self, name, low, high, *, step=1, log=False):
    if log:
      raise ValueError(f"--sampler=grid: suggest_int({name!r}, log=True) spans no grid; "
                       "use suggest_categorical")
    return self._add(name, list(range(low, high + 1, step)))

  def suggest_float(self, name, low, high, *, step=None, log=False):
    if step is None or log:
      raise ValueError(f"--sampler=grid: suggest_float({name!r}) needs step= (and no "
                       "log) to span a grid; or use suggest_categorical")
    count = int(math.floor((high - low) / step + 1e-9)) + 1
    return self._add(name, [low + i * step for i in range(count)])

  def _add(self, name, values):
    self.space[name] = values
    self.params[name] = values[0]
    return values[0]


def grid_space(spec: str, name: str) -> dict[str, list]:
  """The values of each parameter ``search_<name>`` suggests (for Optuna's GridSampler)."""
  function, arg = search_function(spec, name)
  recorder = _GridRecorder()
  function(recorder, arg)
  if not recorder.space:
    raise ValueError(f"--sampler=grid: search_{name}() suggests no parameter")
  return recorder.space


# --- The study ------------------------------------------------------------------------

def storage_url(options: Options, workdir: str) -> str:
  return options.storage or f"sqlite:///{os.path.join(workdir, DATABASE)}"


def shown_url(url: str) -> str:
  """``url`` without its password (it goes into messages and the report)."""
  import sqlalchemy.engine  # noqa: PLC0415 (optuna's dependency)

  try:
    parsed = sqlalchemy.engine.make_url(url)
  except Exception:  # noqa: BLE001 (an unparseable URL: show its scheme only)
    return url.split("://")[0] + "://..."
  if "password" in parsed.query:
    parsed = parsed.update_query_dict({"password": "***"})
  return parsed.render_as_string(hide_password=True)


def has_password(url: str) -> bool:
  import sqlalchemy.engine  # noqa: PLC0415 (optuna's dependency)

  try:
    parsed = sqlalchemy.engine.make_url(url)
  except Exception:  # noqa: BLE001
    return False
  return parsed.password is not None or "password" in parsed.query


def study_name(options: Options, workdir: str) -> str:
  """One study per sweep folder (a shared PostgreSQL database holds many): the name
  ``search.json`` records, else a new one from the folder's path."""
  path = os.path.join(workdir, RECORD)
  if files.exists(path):
    return json.loads(files.read_text(path))["study"]
  return f"effx:{workdir}:{options.name}"


class _Grid:
  """Optuna's GridSampler, without its ``study.stop()`` when the grid is used up (which
  only ``study.optimize`` can take): ``--trials`` ends the search."""

  def __new__(cls, space, seed):
    import optuna  # noqa: PLC0415 (with the search)

    class Grid(optuna.samplers.GridSampler):
      def after_trial(self, study, trial, state, values):
        pass

    return Grid(space, seed=seed)


def _sampler(options: Options):
  import optuna  # noqa: PLC0415 (with the search)

  if options.sampler == "tpe":
    # Several trials at once (--parallel, workers): the running ones count as their
    # worst value so that new trials are not sampled beside them.
    return optuna.samplers.TPESampler(seed=options.seed, constant_liar=options.concurrent)
  if options.sampler == "random":
    return optuna.samplers.RandomSampler(seed=options.seed)
  if options.sampler == "cmaes":
    return optuna.samplers.CmaEsSampler(seed=options.seed)
  return _Grid(grid_space(options.spec, options.name), options.seed)


def _pruner(options: Options, direction: str):
  import optuna  # noqa: PLC0415 (with the search)

  if options.pruner == "median":
    return optuna.pruners.MedianPruner(n_startup_trials=options.startup_trials,
                                       n_warmup_steps=options.warmup_steps)
  if options.pruner == "hyperband":
    return optuna.pruners.HyperbandPruner()
  if options.pruner == "threshold":
    bound = ({"lower": options.threshold} if direction == "maximize"
             else {"upper": options.threshold})
    return optuna.pruners.ThresholdPruner(**bound, n_warmup_steps=options.warmup_steps)
  return optuna.pruners.NopPruner()


def open_study(options: Options, workdir: str, direction: str):
  """The sweep folder's study (created on first use), on a storage with heartbeats and
  the retry of failed-stale trials."""
  import optuna  # noqa: PLC0415 (with the search)
  import sqlalchemy.exc  # noqa: PLC0415 (optuna's dependency)

  optuna.logging.set_verbosity(optuna.logging.WARNING)
  # The heartbeat and its retry are marked experimental, and ask() warns that heartbeats
  # are meant for study.optimize: this module records them itself (``work``).
  warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
  warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
  url = storage_url(options, workdir)
  # A busy SQLite file (several workers on one host) waits instead of failing at once.
  engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
  try:
    storage = optuna.storages.RDBStorage(
        url, engine_kwargs=engine, heartbeat_interval=options.heartbeat,
        grace_period=2 * options.heartbeat,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=_UNLIMITED))
    study = optuna.create_study(
        storage=storage, study_name=study_name(options, workdir), direction=direction,
        sampler=_sampler(options), pruner=_pruner(options, direction), load_if_exists=True)
  except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as error:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    driver = (" (PostgreSQL's driver: pip install 'psycopg[binary]')"
              if isinstance(error, ImportError) else "")
    raise ValueError(f"--storage={shown_url(url)}: cannot open the study there: "
                     f"{first}{driver}") from None
  if study.direction.name.lower() != direction:
    raise ValueError(f"the study in {shown_url(url)} was created to "
                     f"{study.direction.name.lower()}, not to {direction}; give the same "
                     "--direction or another --workdir")
  return study


def record(options: Options, workdir: str, metric: str, direction: str) -> dict:
  """Writes (or checks) ``<workdir>/search.json``: which search of which config file the
  folder's study holds. A different one in the same folder is refused."""
  path = os.path.join(workdir, RECORD)
  mine = {"config": options.spec, "search": options.name,
          "overrides": manifest_lib.jsonable(options.base),
          "storage": shown_url(storage_url(options, workdir)),
          "study": study_name(options, workdir), "metric": metric, "direction": direction}
  if files.exists(path):
    stored = json.loads(files.read_text(path))
    for key in ("config", "search", "overrides", "storage", "study", "metric", "direction"):
      if stored.get(key) != mine[key]:
        raise ValueError(f"{workdir} holds the search {stored['search']} of "
                         f"{stored['config']} ({key} {stored.get(key)!r}, not "
                         f"{mine[key]!r}); use another --workdir")
    return stored
  if files.exists(os.path.join(workdir, manifest_lib.MANIFEST)):
    raise ValueError(f"{workdir} holds a grid sweep (sweep.json); use another --workdir")
  manifest_lib.workdir_lib.write_json_atomic(path, mine)
  return mine


def _copy(trial) -> bool:
  """A trial queued again for an interrupted or stale one (same parameters, workdir)."""
  return bool(trial.system_attrs.get("retry_history"))


def tally(study) -> dict[str, int]:
  """Counts of the study's trials: ``sampled`` (trials of their own, copies and
  surplus ones not counted: what ``--trials`` limits), ``ended`` (complete, pruned, or
  failed and not queued again), ``running`` and ``waiting`` (queued again, not yet
  taken)."""
  from optuna.trial import TrialState  # noqa: PLC0415 (with the search)

  trials = study.get_trials(deepcopy=False)
  retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
  count = {"sampled": 0, "ended": 0, "running": 0, "waiting": 0}
  for t in trials:
    if t.user_attrs.get("surplus"):
      continue
    count["sampled"] += not _copy(t)
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
      count["ended"] += 1
    elif t.state == TrialState.FAIL and t.number not in retried:
      count["ended"] += 1
    elif t.state == TrialState.RUNNING:
      count["running"] += 1
    elif t.state == TrialState.WAITING:
      count["waiting"] += 1
  return count


def _surplus(study, trial, limit: int) -> bool:
  """Whether ``trial`` (just asked) is one more than ``limit``: two workers that both
  counted ``limit - 1`` sampled trials each asked for one."""
  if _copy(trial):
    return False
  before = [t for t in study.get_trials(deepcopy=False)
            if t.number < trial.number and not _copy(t) and not t.user_attrs.get("surplus")]
  return len(before) >= limit


# --- A worker -------------------------------------------------------------------------

@dataclasses.dataclass
class _Running:
  trial: Any                  # optuna.Trial
  name: str                   # its workdir's folder
  process: subprocess.Popen
  log: Any
  steps: int                  # the run's num_train_steps
  reported: set = dataclasses.field(default_factory=set)
  pruned_at: int | None = None


class _Worker:
  """One worker: asks the study for trials and trains them, ``parallel`` at a time (one
  GPU each, or a share of the CPU cores), until ``options.trials`` are sampled and
  nothing runs; reports every evaluation and stops the trials the pruner picks."""

  def __init__(self, options: Options, workdir: str, metric: str, direction: str,
               parallel: int, progress: Callable[[int], None] | None):
    from effx.launch import local  # noqa: PLC0415 (its slots)

    self.options, self.workdir, self.metric = options, workdir, metric
    self.progress = progress
    self.study = open_study(options, workdir, direction)
    # Ask-and-tell has no heartbeat of its own: this worker records them (the storage's
    # public record_heartbeat, by the trial's storage id, as study.optimize's thread does).
    self.storage = self.study._storage  # noqa: SLF001
    self.slots = local.trial_slots(parallel)
    self.running: dict[int, _Running] = {}
    self.last_beat = 0.0
    self.stop_requested: str | None = None  # set by the signal handler (``work``)
    files.makedirs(os.path.join(workdir, "logs"))

  def beat(self, force: bool = False) -> None:
    """Heartbeats of this worker's trials, and stale trials of dead workers queued
    again, every half heartbeat."""
    import optuna  # noqa: PLC0415 (with the search)

    if not force and time.monotonic() - self.last_beat < self.options.heartbeat / 2:
      return
    self.last_beat = time.monotonic()
    for job in self.running.values():
      self.storage.record_heartbeat(job.trial._trial_id)  # noqa: SLF001
    optuna.storages.fail_stale_trials(self.study)

  def tell(self, trial, value=None, state=None) -> None:
    # skip_if_finished: another worker may have failed the trial as stale meanwhile.
    self.study.tell(trial, value, state=state, skip_if_finished=True)

  def requeue(self, trial, reason: str) -> None:
    """Fails ``trial`` with ``reason`` and queues a copy: same parameters and workdir,
    which resumes from its checkpoints (unless another worker failed it as stale first,
    and queued it itself)."""
    import optuna  # noqa: PLC0415 (with the search)

    if not _set(trial, "error", reason):
      return
    self.tell(trial, state=optuna.trial.TrialState.FAIL)
    frozen = next(t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)
    if frozen.state.name == "FAIL" and frozen.user_attrs.get("error") == reason:
      optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=_UNLIMITED)(self.study, frozen)

  def start(self, slot: int) -> None:
    import optuna  # noqa: PLC0415 (with the search)

    from effx.launch import local  # noqa: PLC0415 (its trials' processes)
    from effx.training import objectives  # noqa: PLC0415 (jax)

    trial = self.study.ask()
    # At once: a trial without a heartbeat is never taken for stale.
    self.storage.record_heartbeat(trial._trial_id)  # noqa: SLF001
    frozen = next(t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)
    if _surplus(self.study, frozen, self.options.trials):
      trial.set_user_attr("surplus", True)
      self.tell(trial, state=optuna.trial.TrialState.FAIL)
      return
    name = trial.user_attrs.get("workdir") or f"trial-{trial.number:04d}"
    try:
      if _copy(frozen) and trial.user_attrs.get("overrides") is not None:
        overrides = trial.user_attrs["overrides"]  # as the first attempt ran
      else:
        overrides = overrides_of(self.options.spec, self.options.name, trial,
                                 self.options.base)
      config = trials_lib.trial_config(self.options.spec, overrides)
      trial_metric = objectives.selection_metric(config)[0]
      if trial_metric != self.metric:
        raise ValueError(f"search_{self.options.name}() with {trial.params} trains a run "
                         f"chosen by {trial_metric}, the search's trials by {self.metric}")
    except (ValueError, TypeError, KeyError) as error:  # this trial's config: it fails
      trial.set_user_attr("error", str(error)[:500])
      self.tell(trial, state=optuna.trial.TrialState.FAIL)
      if self.progress:
        self.progress(1)
      return
    except BaseException:
      self.requeue(trial, "interrupted (queued again)")
      raise
    # A trial queued again carries its first attempt's attributes: not its ending.
    for key in ("error", "results", "pruned_at"):
      if key in trial.user_attrs:
        trial.set_user_attr(key, None)
    trial.set_user_attr("workdir", name)
    trial.set_user_attr("overrides", manifest_lib.jsonable(overrides))
    try:
      log = open(os.path.join(self.workdir, "logs", f"{name}.log"), "a", encoding="utf-8")
      process = local.start_trial(
          trials_lib.command(self.options.spec, self.workdir, trials_lib.Trial(name, overrides)),
          log, self.slots[slot]["env"], self.slots[slot]["cpus"])
    except BaseException:
      self.requeue(trial, "interrupted (queued again)")
      raise
    self.running[slot] = _Running(trial, name, process, log, int(config.num_train_steps))

  def follow(self, job: _Running) -> None:
    """Reports the run's new validation values; SIGTERM when the pruner says so (not at
    the last evaluation: the run is then finishing anyway)."""
    for step, value in _validation(os.path.join(self.workdir, job.name), self.metric):
      if step in job.reported:
        continue
      job.reported.add(step)
      job.trial.report(value, step)
      if job.pruned_at is None and step < job.steps and job.trial.should_prune():
        job.pruned_at = step
        job.process.send_signal(signal.SIGTERM)  # the trainer checkpoints, then exits

  def finish(self, job: _Running) -> None:
    import optuna  # noqa: PLC0415 (with the search)

    job.log.close()
    results = manifest_lib.read_results(os.path.join(self.workdir, job.name))
    value = (results or {}).get(f"eval_{self.metric}")
    log = manifest_lib.log_tail(os.path.join(self.workdir, "logs", f"{job.name}.log"))
    if results is not None and job.process.returncode == 0 and value is not None:
      _set(job.trial, "results", results)
      self.tell(job.trial, value)
    elif job.pruned_at is not None:
      _set(job.trial, "pruned_at", job.pruned_at)
      self.tell(job.trial, state=optuna.trial.TrialState.PRUNED)
    elif job.process.returncode == 0 or "is in use by" in log:
      # Stopped by a signal not from this worker (it checkpointed), or its workdir still
      # held by an earlier attempt's trainer finishing its checkpoint: run it again.
      self.requeue(job.trial, "stopped before its end (queued again)")
      return
    else:
      _set(job.trial, "error", log or f"exit status {job.process.returncode}")
      self.tell(job.trial, state=optuna.trial.TrialState.FAIL)
    if self.progress:
      self.progress(1)

  def stop(self) -> None:
    """Stops the running trials (each checkpoints first; heartbeats go on meanwhile) and
    records them: as they ended when they had just ended, else failed ("interrupted") and
    queued again with their own parameters and workdir."""
    # A second Ctrl-C must not leave a trial failed but not queued again.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
      ended = {slot for slot, job in self.running.items() if job.process.poll() is not None}
      for slot, job in self.running.items():
        if slot not in ended:
          job.process.send_signal(signal.SIGTERM)
      while any(job.process.poll() is None for job in self.running.values()):
        self.beat()
        time.sleep(0.2)
      for slot, job in self.running.items():
        if slot in ended or job.pruned_at is not None:
          self.finish(job)
        else:
          job.log.close()
          self.requeue(job.trial, "interrupted (queued again)")
      self.running.clear()
    finally:
      signal.signal(signal.SIGINT, previous)

  def check(self) -> None:
    """Stops between two database calls, never inside one (an interrupted SQLite write
    would keep the file locked)."""
    if self.stop_requested:
      raise KeyboardInterrupt(self.stop_requested)

  def run(self) -> None:
    while True:
      self.check()
      self.beat()
      count = tally(self.study)
      for slot in range(len(self.slots)):
        if slot not in self.running and (
            count["waiting"] or count["sampled"] < self.options.trials):
          self.check()
          self.start(slot)
          count = tally(self.study)
      # Done when nothing runs anywhere: another worker's trial may still die and be
      # queued again (its heartbeat stops), and this worker then resumes it.
      if not self.running and count["running"] == 0 and not count["waiting"]:
        return
      time.sleep(0.5)
      self.check()
      for slot, job in list(self.running.items()):
        self.follow(job)
        if job.process.poll() is not None:
          self.follow(job)  # its last evaluations
          del self.running[slot]
          self.finish(job)


def _set(trial, key: str, value) -> bool:
  """Sets a user attribute of a running trial; False when another worker has failed it
  meanwhile (stale: its heartbeats were late)."""
  import optuna  # noqa: PLC0415 (with the search)

  try:
    trial.set_user_attr(key, value)
  except optuna.exceptions.UpdateFinishedTrialError:
    return False
  return True


def work(options: Options, workdir: str, metric: str, direction: str, *, parallel: int = 1,
         progress: Callable[[int], None] | None = None) -> None:
  """Runs one worker of the search (``_Worker``). Ctrl-C or SIGTERM (a Slurm time
  limit, scancel) stops the running trials (each checkpoints) and queues them again,
  then raises KeyboardInterrupt."""
  worker = _Worker(options, workdir, metric, direction, parallel, progress)

  def request(signum, frame):
    del frame
    worker.stop_requested = worker.stop_requested or signal.Signals(signum).name

  previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    worker.run()
  except BaseException:  # Ctrl-C, SIGTERM, an error: stop what runs first
    worker.stop()
    raise
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def _validation(run_workdir: str, metric: str) -> list[tuple[int, float]]:
  """``(step, value)`` of the run's validation evaluations so far."""
  from effx.training import metrics  # noqa: PLC0415 (jax)

  if not files.exists(os.path.join(run_workdir, "metrics.jsonl")):
    return []
  return [(row["step"], row[metric]) for row in metrics.read(run_workdir)
          if row.get("split") == "validation" and metric in row]

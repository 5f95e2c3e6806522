"""``train_and_evaluate(config, workdir)``: the one training loop of effx.

Resume order (first that applies):
  1. the newest checkpoint in ``workdir/checkpoints`` that restores (older ones are
     tried if the newest is damaged);
  2. parameters from ``config.init_checkpoint`` (a workdir or checkpoint folder);
  3. scratch, from ``config.seed``.
A resumed run restores parameters, optimizer state, step, the data iterator's position
and the best-validation bookkeeping, and dropout keys derive from the step, so it ends
exactly where an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from effx.common import files, lock
from effx.compress import distill
from effx.data import pipeline
from effx.training import checkpoint as ckpt
from effx.training import defaults, metrics
from effx.training import workdir as workdir_lib
from effx.training.run import Run, peak_memory_bytes


def _check_workdir(workdir: str) -> str:
  """The absolute workdir; a path that is a file, or that cannot be created, raises
  before anything is written. A bucket (``gs://...``) is taken as it is."""
  workdir = files.absolute(workdir)
  if files.is_remote(workdir):
    return workdir
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"workdir {workdir} is a file, not a folder; pass a folder "
                             "(new or holding an effx.train run)")
  existing = workdir
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    kind = "a file" if not os.path.isdir(existing) else "not writable"
    raise PermissionError(f"workdir {workdir} cannot be created: {existing} is {kind}")
  return workdir


class _Stop:
  """Set by SIGTERM (preemption), SIGINT (Ctrl-C) or SIGHUP (the terminal closed, or the
  sweep that started the run died): the loop checkpoints the current step and returns.
  A second SIGTERM or SIGINT exits at once: orbax commits a checkpoint by renaming its
  finished folder, so a save cut short leaves the previous checkpoint the newest. SIGHUP
  never does: a dying launcher can deliver it more than once (Linux sends the
  parent-death signal again each time the thread the trainer was reparented to exits),
  and an ignored SIGHUP (``nohup``) stays ignored."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

  def __init__(self):
    self.requested: str | None = None
    self._previous = {}

  def __call__(self, signum, frame):
    del frame
    if signum == signal.SIGHUP:
      self.requested = self.requested or "SIGHUP"
      return
    if self.requested and self.requested != "SIGHUP":
      sys.stderr.write(f"{signal.Signals(signum).name} again: exiting now, without "
                       "checkpointing the current step\n")
      sys.stderr.flush()
      os._exit(128 + signum)
    self.requested = signal.Signals(signum).name

  def agreed(self) -> bool:
    """Whether any process was asked to stop: every host must checkpoint the same step
    (saving is collective), though a signal reaches each one at its own moment."""
    local = self.requested is not None
    if jax.process_count() == 1:
      return local
    anyone = bool(np.any(multihost_utils.process_allgather(np.asarray(local, np.int32))))
    if anyone and not local:
      self.requested = "a signal to another process"
    return anyone

  def install(self) -> None:
    self._previous = {s: signal.signal(s, self) for s in self.SIGNALS
                      if not (s == signal.SIGHUP and signal.getsignal(s) is signal.SIG_IGN)}

  def uninstall(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def _save_config(config, workdir: str) -> None:
  # Atomic: other hosts (and the next run) read it to compare configs.
  if jax.process_index() == 0:
    workdir_lib.write_json_atomic(os.path.join(workdir, "config.json"),
                                  json.loads(config.to_json_best_effort()))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains, evaluates on validation every ``eval_every_steps``, checkpoints, and finally
  tests the best-on-validation parameters. Returns (and writes to
  ``workdir/results.json``) the results."""
  start_time = time.perf_counter()
  workdir = _check_workdir(workdir)
  created = not files.exists(workdir)
  # One process per workdir: a second one stops here, before it reads or writes anything
  # (processes of one multi-host run share it: process 0 holds it for them).
  with _run_lock(workdir):
    try:
      return _train_and_evaluate(config, workdir, start_time, created)
    except BaseException:
      # Still holding the lock: a run that failed before writing anything leaves no
      # folder that only the lock made (a refused process never gets here).
      if created and jax.process_index() == 0:
        lock.remove_if_only_locked(workdir)
      raise


@contextlib.contextmanager
def _run_lock(workdir: str):
  """The workdir's lock, taken by process 0 for every process of the run: when process 0
  is refused, all of them stop together (none waits at a collective for it)."""
  with contextlib.ExitStack() as stack:
    refused = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(lock.workdir_lock(workdir, "effx.train"))
      except lock.WorkdirInUseError as error:
        refused = error
    if jax.process_count() > 1:
      flag = multihost_utils.broadcast_one_to_all(np.int32(refused is not None))
      if int(flag) and refused is None:
        raise lock.WorkdirInUseError(f"workdir {workdir} is in use: process 0 of this run "
                                     "was refused its lock (its log names the holder)")
    if refused is not None:
      raise refused
    yield


def _train_and_evaluate(config, workdir: str, start_time: float, created: bool):
  run = Run(config)  # validates the config and loads the data; writes nothing
  for part in run.parts:
    if part.training_error:
      raise ValueError(part.training_error)
  config_values = json.loads(config.to_json_best_effort())
  changes = workdir_lib.check_resume(
      workdir, config_values,
      json.loads(defaults.base(config.data.task).to_json_best_effort()))
  try:
    files.makedirs(workdir)
    checkpoints = ckpt.Checkpoints(workdir, config.keep_checkpoints)
    restored = checkpoints.restore_latest(run.abstract_state)
    reached = workdir_lib.steps_reached(workdir)
    if restored is None and reached > 0:
      raise ckpt.CheckpointError(
          f"workdir {workdir} holds a run that reached step {reached} (sessions.json) but "
          f"no checkpoint in {checkpoints.directory}; starting over would overwrite its "
          "logs and results. Use another --workdir, or put the checkpoints back")
  except BaseException:
    # A failed start leaves no half-made workdir behind (only one it created itself).
    if created and jax.process_index() == 0:
      files.rmtree(workdir)
    raise
  objective = run.objective
  meta = {"best_value": None, "best_step": -1}
  if restored is not None:
    state, data_state, meta, start = restored
    if "best_accuracy" in meta:  # written before objectives named their metric
      meta["best_value"] = meta.pop("best_accuracy")
    last_train = {"loss": meta.pop("train_loss", float("nan"))}
    checkpoints.drop_best_after(start)
    checkpoints.read_best_references()
    logging.info("resumed from %s at step %d", checkpoints.directory, start)
    for key, (old, new) in changes.items():
      logging.info("config.%s changed from %r to %r (recorded in sessions.json)", key, old,
                   new)
    if "max_eval_examples" in changes and meta["best_step"] >= 0:
      # The best so far was measured on the old validation subset: measure it again on
      # the new one, so later checkpoints are compared with it on equal terms.
      best = checkpoints.restore_best({"params": run.abstract_state.params,
                                       "model_state": run.abstract_state.model_state},
                                      meta["best_step"])
      meta["best_value"] = run.evaluate(best["params"], best["model_state"], "validation",
                                        limit=config.max_eval_examples or None)[
                                            run.objective.best_metric]
      logging.info("best checkpoint (step %d) re-validated on the new subset: %s %.4f",
                   meta["best_step"], run.objective.best_metric, meta["best_value"])
  else:
    state, data_state, start, last_train = run.init_state(), None, 0, {}
    if config.init_checkpoint:
      params = ckpt.restore_params(config.init_checkpoint, run.abstract_state.params)
      state = state.replace(params=params)
      logging.info("initialised parameters from %s", config.init_checkpoint)
    elif run.teacher is not None and config.distill.init_from_teacher:
      params, kept = distill.init_student(state.params, run.teacher.variables["params"],
                                          run.objective.layer_map)
      state = state.replace(params=jax.device_put(params, run.state_shardings.params))
      logging.info("initialised the student from the teacher's layers %s%s",
                   list(run.objective.layer_map),
                   f"; not in the teacher, kept fresh: {', '.join(kept)}" if kept else "")
  if run.teacher is not None:
    run.teacher.record(workdir)
  _save_config(config, workdir)
  logging.info("config:\n%s", config)
  logging.info("model: %s attention on %s (implementation=%r), %d parameters; mesh %s; "
               "%d devices", config.model.attention, run.attention_backend,
               config.model.implementation,
               sum(x.size for x in jax.tree.leaves(run.abstract_state.params)),
               dict(run.mesh.shape), jax.device_count())
  writer = metrics.Writer(workdir, resume_step=start)
  sessions = workdir_lib.Sessions(workdir, start, changes, started_at=start_time,
                                  enabled=jax.process_index() == 0)
  sessions.update(start)

  dataset = pipeline.train_dataset(run.task.splits["train"], config.batch_size, config.seed)
  iterator = pipeline.train_iterator(dataset, data_state, threads=config.data_threads)
  stop = _Stop()
  stop.install()
  # A pruned run's best checkpoint must have its final sparsity: chosen after pruning ends.
  best_from = max([0] + [part.best_from() for part in run.parts])
  progress = metrics.Progress(start, config.num_train_steps, config.batch_size,
                              objective.progress)
  pending: list[dict[str, jax.Array]] = []
  last_good, step = start, start

  def diverged(what: str, value: float, at: int):
    kept = (f"The last good checkpoint (step {last_good}) is kept in {checkpoints.directory}."
            if last_good > 0 else "No checkpoint was saved before it.")
    raise FloatingPointError(
        f"{what} is {value} at step {at}; stopping. {kept} Rerun in another --workdir with "
        "a lower config.learning_rate, config.grad_clip_norm set or config.model.dtype="
        "'float32' (add --config.init_checkpoint=<this workdir> to start from its "
        "parameters).")

  def drain() -> dict[str, float]:
    """Averages the metrics since the last report; stops on a non-finite loss or
    parameters (their norm after the step's update)."""
    nonlocal pending
    values = jax.device_get(pending)
    pending = []
    finite = np.array([[np.isfinite(v["loss"]), np.isfinite(v["param_norm"])] for v in values])
    if not finite.all():
      first, column = np.argwhere(~finite)[0]  # earliest step; its loss before its update
      what = ("loss", "param_norm")[column]
      diverged(what, values[first][what], step - len(values) + first + 1)
    return {k: float(np.mean([v[k] for v in values])) for k in values[0]}

  stopping = False
  try:
    while step < config.num_train_steps and not stopping:
      state, step_metrics = run.train_step(state, next(iterator))
      pending.append(step_metrics)
      step += 1
      stopping = stop.agreed()  # one agreement per step; a later signal stops the next
      done = step == config.num_train_steps
      evaluate = step % config.eval_every_steps == 0 or done
      save = step % config.checkpoint_every_steps == 0 or done or stopping
      # Report (and check for NaN) before any evaluation or save, so neither the best
      # checkpoint nor a regular one can hold a diverged state.
      if step % config.log_every_steps == 0 or evaluate or save:
        last_train = drain()
        last_train.update(progress.update(step, last_train))
        writer.write(step, "train", last_train)
      if evaluate:
        result = run.evaluate(state.params, state.model_state, "validation",
                              limit=config.max_eval_examples or None)
        for part in run.parts:
          result.update(part.metrics(state.params))
        writer.write(step, "validation", {k: v for k, v in result.items() if k != "examples"})
        if not np.isfinite(result["loss"]):  # finite but diverged parameters
          diverged("validation loss", result["loss"], step)
        name, value = objective.best_metric, result[objective.best_metric]
        progress.message(f"step {step}: validation {name} {value:.4f}")
        best = meta["best_value"]
        better = best is None or (value > best if objective.higher_is_better else value < best)
        if better and step >= best_from:
          meta = {"best_value": value, "best_step": step}
          checkpoints.save_best(step, {"params": state.params, "model_state": state.model_state})
      if save:
        checkpoints.save(step, state, iterator.get_state(),
                         {**meta, "train_loss": last_train.get("loss", float("nan"))})
        last_good = step
        sessions.update(step)
  except BaseException:
    sessions.update(last_good, "failed")
    raise
  finally:
    progress.close()
    try:
      # Still under the loop's handler: a second Ctrl-C while the last checkpoint is
      # written exits at once (orbax commits by rename, so the previous one stays whole)
      # instead of a KeyboardInterrupt traceback from inside orbax's wait.
      checkpoints.wait()
    finally:
      stop.uninstall()

  if stopping and step < config.num_train_steps:
    logging.warning("%s: checkpointed step %d in %s; rerun the same command to resume",
                    stop.requested, step, checkpoints.directory)
    sessions.update(step, "interrupted")
    checkpoints.close()
    writer.close()
    return {"step": step, "interrupted": True}

  best_target = {"params": run.abstract_state.params,
                 "model_state": run.abstract_state.model_state}
  best = checkpoints.restore_best(best_target, meta["best_step"])
  test_limit = config.max_test_examples or None
  test_best = run.evaluate(best["params"], best["model_state"], "test", limit=test_limit)
  test_last = run.evaluate(state.params, state.model_state, "test", limit=test_limit)
  name = objective.best_metric
  writer.write(step, "test", {name: test_best[name], f"{name}_last": test_last[name]})
  sessions.update(step, "finished")
  results = {
      "step": step,
      "final_train_loss": last_train.get("loss", float("nan")),
      f"eval_{name}": meta["best_value"],
      "best_step": meta["best_step"],
      f"test_{name}": test_best[name],
      f"test_{name}_last_checkpoint": test_last[name],
      "test_examples": test_best["examples"],
      # Every session's, data loading and compiling included; per session below.
      "wall_time_s": round(sum(s["wall_time_s"] for s in sessions.all()), 3),
      "peak_memory_bytes": peak_memory_bytes(),
      "num_parameters": int(sum(x.size for x in jax.tree.leaves(state.params))),
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "attention_backend": run.attention_backend,
      "config": config_values,
  }
  for part in run.parts:
    results.update(part.results(state.params))
  results["sessions"] = sessions.all()
  if jax.process_index() == 0:
    workdir_lib.write_json_atomic(os.path.join(workdir, "results.json"), results)
  logging.info("done: validation %s %.4f (step %d), test %.4f (last checkpoint %.4f)", name,
               results[f"eval_{name}"], results["best_step"], results[f"test_{name}"],
               results[f"test_{name}_last_checkpoint"])
  checkpoints.close()
  writer.close()
  return results

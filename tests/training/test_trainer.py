"""The training loop in-process: every task trains, bad input fails early, damaged or
diverging runs keep what was saved."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from effx import cli
from effx.data import pipeline
from effx.training import checkpoint as ckpt
from effx.training import loop as trainer
from effx.training import metrics, optim, restore, validate
from effx.training import workdir as workdir_lib
from effx.training.restore import evaluate_workdir
from effx.training.run import Run
from conftest import CONFIGS, listops_config, tiny_config

# Every run of a program an earlier test compiled loads it (the session's compilation
# cache, tests/conftest.py); the runs that resume, damage or reread a finished run start
# from ``listops_run``.


# 1024 pixel tokens: 8 examples of each split, in batches of 4.
PATHFINDER = {"data.num_train": 8, "data.num_valid": 8, "data.num_test": 8, "batch_size": 4}


def _train_losses(workdir):
  return [r["loss"] for r in metrics.read(workdir) if r["split"] == "train"]


def test_a_finished_run_writes_its_results(listops_run):
  losses = _train_losses(listops_run)
  assert len(losses) == 6 and losses[-1] < losses[0], losses
  saved = json.loads((listops_run / "results.json").read_text())
  for key in ("step", "final_train_loss", "eval_accuracy", "test_accuracy", "wall_time_s",
              "peak_memory_bytes", "config"):
    assert key in saved
  assert saved["step"] == saved["config"]["num_train_steps"] == 30
  assert 0.0 <= saved["test_accuracy"] <= 1.0 and saved["peak_memory_bytes"] > 0
  assert (listops_run / "tensorboard").is_dir()


def _short(name, **overrides):
  """``name``'s tiny config for 6 steps over 2 batches of training data (sized by the
  caller): each logged loss (every 2 steps) is over the whole training set, so the first
  and last compare like with like."""
  return tiny_config(name, **{"num_train_steps": 6, "eval_every_steps": 6,
                              "checkpoint_every_steps": 6, "log_every_steps": 2,
                              **overrides})


@pytest.mark.slow  # a training run per task
@pytest.mark.parametrize("name,overrides", [
    ("lra_listops", {"model.dtype": "bfloat16", "data.num_train": 16}),
    ("lra_pathfinder", PATHFINDER),
    # 16K tokens a row: one a batch (running them, not compiling, is most of the time)
    pytest.param("lra_pathx", {"data.num_train": 2, "data.num_valid": 1, "data.num_test": 1,
                               "batch_size": 1}, marks=pytest.mark.slow),
])
def test_generated_tasks_train_and_loss_falls(tmp_path, name, overrides):
  config = _short(name, **overrides)
  results = trainer.train_and_evaluate(config, str(tmp_path))
  losses = _train_losses(tmp_path)
  assert len(losses) == config.num_train_steps // 2 and losses[-1] < losses[0], losses
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["step"] == config.num_train_steps == results["step"]
  assert 0.0 <= saved["test_accuracy"] <= 1.0


@pytest.mark.slow  # a training run per task
@pytest.mark.parametrize("name,overrides", [("lra_text", {"data.max_len": 128}),
                                            ("lra_image", {"batch_size": 4})])
def test_tfds_tasks_train_on_mock_data(tmp_path, name, overrides):
  config = _short(name, **overrides)
  examples = 2 * config.batch_size
  with tfds.testing.mock_data(num_examples=examples, policy=tfds.testing.MockPolicy.USE_CODE):
    trainer.train_and_evaluate(config, str(tmp_path))
  losses = _train_losses(tmp_path)
  assert len(losses) == 3 and losses[-1] < losses[0], losses


@pytest.mark.slow  # three training runs, two through Pallas kernels in interpret mode
def test_the_kernel_backends_train_like_xla(tmp_path):
  """Local attention trained 6 steps with model.implementation='pallas' and 'splash'
  logs the xla run's losses (relative 1e-5) and records the backend each ran on."""
  runs = {}
  for implementation in ("xla", "pallas", "splash"):
    config = _short("lra_listops", **{"model.attention": "local",
                                       "model.attention_kwargs": {"window": 16},
                                       "model.implementation": implementation})
    results = trainer.train_and_evaluate(config, str(tmp_path / implementation))
    assert results["attention_backend"] == implementation
    runs[implementation] = _train_losses(tmp_path / implementation)
  np.testing.assert_allclose(runs["pallas"], runs["xla"], rtol=1e-5)
  np.testing.assert_allclose(runs["splash"], runs["xla"], rtol=1e-5)


@pytest.mark.slow  # a dual-encoder training run
def test_retrieval_trains(tmp_path, retrieval_dir):  # 16 training pairs
  config = _short("lra_retrieval", **{"data.dir": retrieval_dir, "data.max_len": 32})
  trainer.train_and_evaluate(config, str(tmp_path / "run"))
  losses = _train_losses(tmp_path / "run")
  assert len(losses) == 3 and losses[-1] < losses[0], losses


def test_best_checkpoint_is_tested_and_evaluate_entry_point(listops_copy):
  workdir = listops_copy
  results = json.loads((workdir / "results.json").read_text())
  rows = [r for r in metrics.read(workdir) if r["split"] == "validation"]
  best = max(rows, key=lambda r: r["accuracy"])
  assert results["eval_accuracy"] == best["accuracy"]
  assert results["best_step"] == best["step"]
  again = evaluate_workdir(str(workdir), "test", checkpoint="best")
  assert again["accuracy"] == pytest.approx(results["test_accuracy"])
  assert (again["checkpoint"], again["step"]) == ("best", results["best_step"])
  last = evaluate_workdir(str(workdir), "test")
  assert (last["checkpoint"], last["step"]) == ("latest", 30)
  assert last["accuracy"] == pytest.approx(results["test_accuracy_last_checkpoint"])
  assert (workdir / "eval_test_latest_30.json").exists()
  by_step = evaluate_workdir(str(workdir), "test", checkpoint=30)
  assert (by_step["checkpoint"], by_step["accuracy"]) == ("step", last["accuracy"])
  with pytest.raises(FileNotFoundError, match="no checkpoint of step 7 .* steps: .*30"):
    evaluate_workdir(str(workdir), "test", checkpoint="7")
  # The README's command, as a user runs it.
  done = subprocess.run([sys.executable, "-m", "effx.evaluate", f"--workdir={workdir}",
                         "--split=test"], capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.startswith("latest checkpoint (step 30), test: accuracy"), done.stdout
  assert f"{last['accuracy']:.4f}" in done.stdout, done.stdout


def test_damaged_newest_checkpoint_falls_back_to_an_older_one(listops_copy):
  newest = listops_copy / "checkpoints" / "30"
  for path in (newest / "state").rglob("*"):
    if path.is_file() and "manifest" in path.name or path.suffix == ".ocdbt":
      path.write_bytes(b"garbage")
  shutil.rmtree(newest / "state" / "d", ignore_errors=True)
  results = trainer.train_and_evaluate(listops_config(), str(listops_copy))
  assert results["step"] == 30
  assert results["sessions"][-1]["start_step"] == 20  # resumed from the older one
  assert (listops_copy / "checkpoints" / "30.damaged").is_dir()  # set aside, not deleted
  assert (listops_copy / "checkpoints" / "30").is_dir()


@pytest.mark.slow  # a training run per logging setting
@pytest.mark.parametrize("log_every", [1, 100])
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                              log_every):
  """Also when the NaN arrives between log steps: the loop checks the training loss, the
  updated parameters' norm and the validation loss before it saves a best or a regular
  checkpoint. The learning rate jumps to 1e12 after 4 good steps."""
  real = optim.schedule

  def exploding(config):
    good = real(config)
    return lambda count: jnp.where(count < 4, good(count), 1e12)

  monkeypatch.setattr(optim, "schedule", exploding)
  config = listops_config(checkpoint_every_steps=1, eval_every_steps=1,
                          log_every_steps=log_every)
  diverged = r"(loss|param_norm|validation loss) is (nan|inf) at step [5-9].*step 4\)"
  with pytest.raises(FloatingPointError, match=diverged):
    trainer.train_and_evaluate(config, str(tmp_path))
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 4  # no diverged state was saved over the good one
  for path in sorted((tmp_path / "best").iterdir()):
    params = ocp.StandardCheckpointer().restore(path / "params")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), path
  sessions = json.loads((tmp_path / "sessions.json").read_text())
  assert [(s["step"], s["status"]) for s in sessions] == [(4, "failed")]


@pytest.mark.parametrize("override,error,match", [
    (("batch_sise", "3"), ValueError, r"unknown key config.batch_sise; valid keys here: .*"
                                      r"batch_size"),
    (("model.num_layer", "3"), ValueError, "unknown key config.model.num_layer"),
    (("batch_size", "'big'"), TypeError, "--config.batch_size='big': wrong type"),
])
def test_bad_overrides_name_the_key(override, error, match):
  config = tiny_config("lra_listops")
  with pytest.raises(error, match=match):
    cli.apply_overrides(config, [override])


def test_attention_options_can_be_added_one_by_one():
  config = tiny_config("lra_listops")
  cli.apply_overrides(config, [("model.attention", "performer"),
                               ("model.attention_kwargs.num_features", "16")])
  assert config.model.attention_kwargs.num_features == 16
  validate.config(config)


@pytest.mark.parametrize("overrides,error,match", [
    ({"mesh.data": 3}, ValueError, r"mesh \(data=3, model=1\) does not divide the 1 devices"),
    ({"batch_size": 6, "grad_accum_steps": 4}, ValueError, "batch_size=6 is not divisible by "
                                                           "config.grad_accum_steps=4"),
    ({"model.kind": "causal_lm"}, ValueError, "model.kind='causal_lm' does not fit"),
    ({"model.attention": "bigbird", "model.kind": "classifier", "schedule": "linear"},
     ValueError, "schedule='linear'"),
    ({"model.attention_kwargs": {"window": -1}, "model.attention": "local"}, ValueError,
     "window=-1"),
])
def test_bad_config_fails_before_compiling(overrides, error, match):
  config = tiny_config("lra_listops")
  with config.unlocked():
    for key, value in overrides.items():
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  with pytest.raises(error, match=match):
    validate.config(config)


def test_unknown_top_level_key():
  config = tiny_config("lra_listops")
  with config.unlocked():
    config.lr = 0.1
  with pytest.raises(ValueError, match="unknown config key.*config.lr"):
    validate.config(config)


def test_bad_workdir_and_missing_dataset_leave_nothing_behind(tmp_path, monkeypatch):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(NotADirectoryError, match=f"workdir {blocker} is a file"):
    trainer.train_and_evaluate(tiny_config("lra_listops"), str(blocker))
  with pytest.raises(PermissionError, match=f"cannot be created: {blocker} is a file"):
    trainer.train_and_evaluate(tiny_config("lra_listops"), str(blocker / "run"))
  with pytest.raises(FileNotFoundError, match="download_and_prepare"):
    trainer.train_and_evaluate(tiny_config("lra_text", **{"data.dir": str(tmp_path)}),
                               str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  # A start that fails after the workdir was made removes the workdir it made.
  def fail(*args, **kwargs):
    raise OSError("disk full")
  monkeypatch.setattr(ckpt.Checkpoints, "restore_latest", fail)
  with pytest.raises(OSError, match="disk full"):
    trainer.train_and_evaluate(tiny_config("lra_listops"), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep")
  with pytest.raises(OSError, match="disk full"):  # but never a folder that was there
    trainer.train_and_evaluate(tiny_config("lra_listops"), str(tmp_path / "mine"))
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def _listing(path):
  return sorted(str(p.relative_to(path)) for p in path.rglob("*") if "tensorboard" not in p.parts)


def test_a_workdir_holds_one_run(listops_copy):
  """A config that would change the results is refused, naming every differing key and
  touching nothing; harmless changes resume and are recorded per session."""
  workdir = listops_copy
  before = {p: (workdir / p).read_bytes() for p in _listing(workdir)
            if (workdir / p).is_file()}
  local = listops_config(**{"model.attention": "local", "learning_rate": 0.1})
  with pytest.raises(workdir_lib.ConfigMismatchError) as error:
    trainer.train_and_evaluate(local, str(workdir))
  message = str(error.value)
  assert "model.attention: 'dense' (stored) -> 'local' (now)" in message
  assert "learning_rate: 0.003 (stored) -> 0.1 (now)" in message
  assert f"--config.init_checkpoint={workdir}" in message
  other_task = tiny_config("lra_pathfinder", **PATHFINDER)
  with pytest.raises(workdir_lib.ConfigMismatchError, match="data.task: 'listops'"):
    trainer.train_and_evaluate(other_task, str(workdir))
  after = {p: (workdir / p).read_bytes() for p in _listing(workdir) if (workdir / p).is_file()}
  assert after == before  # nothing renamed, rewritten or deleted

  longer = listops_config(num_train_steps=40, eval_every_steps=5)
  results = trainer.train_and_evaluate(longer, str(workdir))
  assert results["step"] == 40
  sessions = json.loads((workdir / "sessions.json").read_text())
  assert [(s["start_step"], s["step"], s["status"]) for s in sessions] == [
      (0, 30, "finished"), (30, 40, "finished")]
  assert sessions[1]["config_changes"] == {
      "eval_every_steps": {"stored": 15, "now": 5},
      "num_train_steps": {"stored": 30, "now": 40}}
  assert results["wall_time_s"] == pytest.approx(sum(s["wall_time_s"] for s in sessions))
  assert results["sessions"] == sessions
  assert json.loads((workdir / "config.json").read_text())["num_train_steps"] == 40


def test_a_checkpoint_of_another_model_is_not_called_damaged(listops_copy):
  (listops_copy / "config.json").unlink()  # as if written by a version that kept no config
  wider = listops_config(**{"model.emb_dim": 48, "model.qkv_dim": 48})
  with pytest.raises(ckpt.StructureMismatchError,
                     match=r"holds a different model.*\n  params/encoder/embed/cls: stored "
                           r"\(32,\), model \(48,\)"):
    trainer.train_and_evaluate(wider, str(listops_copy))
  assert sorted(p.name for p in (listops_copy / "checkpoints").iterdir()) == [
      "10", "20", "30"]  # none moved


def _tensorboard_scalars(workdir):
  """``{(tag, step): value}`` of every event file, read with the record format (length,
  crc, Event proto, crc) written out here rather than through tensorboardX."""
  import struct

  from tensorboardX.proto import event_pb2

  files = sorted((workdir / "tensorboard").glob("events.out.tfevents.*"))
  scalars = []
  for path in files:
    data = path.read_bytes()
    at = 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 12 + length + 4
      scalars += [((v.tag, event.step), v.simple_value) for v in event.summary.value]
  return files, scalars


def test_a_resumed_run_logs_each_step_once(listops_copy):
  """Rows of steps a killed session ran past its last checkpoint are dropped on resume
  and redone; metrics.jsonl and TensorBoard hold each (split, step) once."""
  workdir = listops_copy
  shutil.rmtree(workdir / "checkpoints" / "30")  # the session died before saving step 30
  trainer.train_and_evaluate(listops_config(), str(workdir))
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  keys = [(r["split"], r["step"]) for r in rows]
  assert sorted(keys) == sorted(set(keys))
  assert sorted(keys) == [("test", 30), ("train", 5), ("train", 10), ("train", 15),
                          ("train", 20), ("train", 25), ("train", 30), ("validation", 15),
                          ("validation", 30)]
  files, scalars = _tensorboard_scalars(workdir)
  assert len(files) == 1
  tags = [tag_step for tag_step, _ in scalars]
  assert len(tags) == len(set(tags))
  assert dict(scalars)[("train/loss", 25)] == pytest.approx(
      next(r["loss"] for r in rows if (r["split"], r["step"]) == ("train", 25)))
  assert {step for (tag, step) in tags if tag.startswith("validation/")} == {15, 30}


@pytest.mark.slow  # a training run from another run's parameters
def test_init_checkpoint_starts_from_another_runs_params(listops_run, tmp_path):
  """One step from another run's newest checkpoint (the same program as that run's, so
  compiled once): AdamW's first update moves no parameter by more than the learning
  rate, while the other run's own last 20 steps moved some by far more."""
  config = listops_config(num_train_steps=1, init_checkpoint=str(listops_run))
  trainer.train_and_evaluate(config, str(tmp_path / "b"))

  def params(workdir, step):
    state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return state["params"], int(state["step"])

  (a, _), (earlier, _), (b, b_step) = (params(listops_run, 30), params(listops_run, 10),
                                       params(tmp_path / "b", 1))
  assert b_step == 1  # a new run's step count, not the other run's
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(b))
  step_moved = max(np.abs(x - y).max() for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  trained = max(np.abs(x - y).max() for x, y in zip(jax.tree.leaves(a),
                                                     jax.tree.leaves(earlier)))
  assert step_moved <= config.learning_rate < trained / 10, (step_moved, trained)


@pytest.mark.slow  # two training runs
def test_gradient_accumulation_matches_the_full_batch():
  """Three steps on the same batches: the losses, gradient norms and updated
  parameters' norms of 2 micro-batches are the full batch's."""
  seen = {}
  for accumulate in (1, 2):
    run = Run(listops_config(grad_accum_steps=accumulate))
    batches = pipeline.train_iterator(pipeline.train_dataset(
        run.task.splits["train"], run.config.batch_size, run.config.seed))
    state = run.init_state()
    seen[accumulate] = []
    for _ in range(3):
      state, step_metrics = run.train_step(state, next(batches))
      seen[accumulate].append({k: float(step_metrics[k]) for k in ("loss", "grad_norm",
                                                                   "param_norm")})
  for full, micro in zip(seen[1], seen[2]):
    assert micro == pytest.approx(full, rel=1e-5)
  assert seen[1][2]["param_norm"] != seen[1][0]["param_norm"]  # the steps did update


def test_metrics_survive_a_line_torn_by_a_kill(tmp_path):
  writer = metrics.Writer(str(tmp_path))
  writer.write(1, "train", {"loss": 2.0})
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 2, "split": "tra')  # killed mid-write
  writer = metrics.Writer(str(tmp_path), resume_step=1)  # the run resumed from step 1
  writer.write(2, "train", {"loss": 1.5})
  writer.close()
  assert [(r["step"], r["loss"]) for r in metrics.read(str(tmp_path))] == [(1, 2.0), (2, 1.5)]


@pytest.mark.slow  # fresh python -m effx.train processes
def test_user_errors_print_one_line(tmp_path):
  """From the command line a user error is one line on stderr and status 1, with no
  traceback, no config dump and no workdir; EFFX_TRACEBACK=1 shows the traceback. (The
  three commands run side by side: each is mostly Python starting up.)"""
  base = [sys.executable, "-m", "effx.train", f"--config={CONFIGS / 'lra_listops.py'}:tiny",
          f"--workdir={tmp_path / 'run'}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cases = [("--config.batch_sise=3", "unknown key config.batch_sise", env),
           ("--config.model.attention=nope", "unknown attention family 'nope'", env),
           ("--config.batch_sise=3", None, {**env, "EFFX_TRACEBACK": "1"})]
  started = [subprocess.Popen([*base, bad], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=case_env) for bad, _, case_env in cases]
  finished = [(p.communicate(timeout=300)[1], p.returncode) for p in started]
  for (_, says, _), (stderr, returncode) in zip(cases, finished):
    if says is None:  # EFFX_TRACEBACK=1
      assert returncode != 0 and "Traceback" in stderr
      continue
    assert returncode == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if not line.startswith(("I", "W"))]
    assert errors[0].startswith("error: ") and says in errors[0], stderr[-3000:]
    assert errors[1:] == ["(EFFX_TRACEBACK=1 shows the traceback)"], stderr[-3000:]
    assert "Traceback" not in stderr and "config:" not in stderr
  assert not (tmp_path / "run").exists()


def test_a_second_signal_exits_at_once(monkeypatch, capsys):
  """The first SIGINT asks the loop to checkpoint and return; a second exits the process
  at once (status 130) with one line, whatever the loop is doing."""
  exits = []
  monkeypatch.setattr(trainer.os, "_exit", exits.append)
  stop = trainer._Stop()
  stop(signal.SIGINT, None)
  assert stop.requested == "SIGINT" and not exits
  stop(signal.SIGINT, None)
  assert exits == [130]
  assert "SIGINT again: exiting now" in capsys.readouterr().err


def test_sighup_stops_once_and_never_escalates(monkeypatch, capsys):
  """SIGHUP (a dying launcher's parent-death signal, possibly more than once) asks for a
  checkpoint and never exits at once; a SIGTERM after it is still a first stop request,
  a second SIGTERM exits. Under nohup (SIGHUP ignored) it stays ignored."""
  exits = []
  monkeypatch.setattr(trainer.os, "_exit", exits.append)
  stop = trainer._Stop()
  stop(signal.SIGHUP, None)
  stop(signal.SIGHUP, None)
  assert stop.requested == "SIGHUP" and not exits
  stop(signal.SIGTERM, None)
  assert stop.requested == "SIGTERM" and not exits
  stop(signal.SIGTERM, None)
  assert exits == [128 + signal.SIGTERM]
  assert "SIGTERM again: exiting now" in capsys.readouterr().err
  previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
  try:
    ignoring = trainer._Stop()
    ignoring.install()
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is ignoring
    ignoring.uninstall()
  finally:
    signal.signal(signal.SIGHUP, previous)


def test_no_restorable_checkpoint_stops_instead_of_starting_over(listops_copy):
  workdir = listops_copy
  for step in ("10", "20", "30"):
    for path in (workdir / "checkpoints" / step / "state").rglob("*"):
      if path.is_file():
        path.write_bytes(b"garbage")
  before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  with pytest.raises(ckpt.CheckpointError, match="no checkpoint in .* restores .nothing was"):
    trainer.train_and_evaluate(listops_config(), str(workdir))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
  shutil.rmtree(workdir / "checkpoints")  # gone altogether: the run's history says 30
  with pytest.raises(ckpt.CheckpointError, match="reached step 30 .* but no checkpoint"):
    trainer.train_and_evaluate(listops_config(), str(workdir))
  assert (workdir / "results.json").exists()


def test_a_best_checkpoint_lives_while_a_kept_checkpoint_points_at_it(tmp_path):
  checkpoints = ckpt.Checkpoints(str(tmp_path), keep=2, asynchronous=False)
  state, params = {"w": jnp.ones(3)}, {"w": jnp.zeros(3)}
  checkpoints.save_best(5, params)
  checkpoints.save(10, state, {}, {"best_step": 5})
  checkpoints.save_best(15, params)  # a new best after the checkpoint of step 10
  assert checkpoints.best.all_steps() == [5, 15]  # resuming from 10 needs best 5
  checkpoints.save(20, state, {}, {"best_step": 15})
  assert sorted(checkpoints.best.all_steps()) == [5, 15]
  checkpoints.save(30, state, {}, {"best_step": 15})  # checkpoint 10 is gone now
  assert checkpoints.best.all_steps() == [15]
  checkpoints.close()


@pytest.mark.slow  # resumes a finished run for more steps
def test_old_workdirs_evaluate_and_resume(listops_copy):
  stored = json.loads((listops_copy / "config.json").read_text())
  del stored["distill"], stored["prune"]  # a run made before these sections existed
  (listops_copy / "config.json").write_text(json.dumps(stored))
  assert evaluate_workdir(str(listops_copy), "test")["step"] == 30
  longer = listops_config(num_train_steps=40)
  assert trainer.train_and_evaluate(longer, str(listops_copy))["step"] == 40


@pytest.mark.slow  # resumes a finished run for more steps
def test_a_new_validation_subset_revalidates_the_best_checkpoint(listops_copy):
  """The best value a resumed run compares with is measured on its own subset."""
  config = listops_config(num_train_steps=40, max_eval_examples=48)
  results = trainer.train_and_evaluate(config, str(listops_copy))
  run, params, model_state, step = restore.restore(str(listops_copy), "best")
  assert step == results["best_step"]
  on_48 = run.evaluate(params, model_state, "validation", limit=48)
  assert results["eval_accuracy"] == on_48["accuracy"]


@pytest.mark.parametrize("key,value,match", [
    ("seed", True, r"config.seed=True must be an int"),
    ("learning_rate", "high", r"config.learning_rate='high' must be a number"),
    ("model.num_heads", 2.0, r"model.num_heads=2.0 must be an int"),
    ("model.attention_kwargs", 3, r"model.attention_kwargs=3 must be a mapping"),
    ("data.tokenizer", 1, r"data.tokenizer=1 must be a string"),
    ("prune.target_sparsity", "most", r"prune.target_sparsity='most' must be a number"),
    ("distill.layer_map", (True,), r"distill.layer_map=\(True,\) must be a sequence of ints"),
])
def test_every_section_checks_types_by_one_rule(key, value, match):
  config = tiny_config("lra_listops")
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[leaf] = value
  with pytest.raises(TypeError, match=match):
    validate.config(config)

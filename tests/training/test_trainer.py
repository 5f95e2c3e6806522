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

from effx.training import checkpoint as ckpt
from effx import cli
from effx.training import loop as trainer
from effx.training import metrics, optim, validate
from effx.training import workdir as workdir_lib
from effx.training.restore import evaluate_workdir
from conftest import CONFIGS, tiny_config


def _train_losses(workdir):
  return [r["loss"] for r in metrics.read(workdir) if r["split"] == "train"]


@pytest.mark.parametrize("name,overrides", [
    ("lra_listops", {}),
    ("lra_listops", {"model.dtype": "bfloat16"}),
    ("lra_pathfinder", {"data.num_train": 16, "data.num_valid": 16, "data.num_test": 16}),
    ("lra_pathx", {"data.num_train": 8, "data.num_valid": 8, "data.num_test": 8,
                   "num_train_steps": 10, "batch_size": 4}),
])
def test_generated_tasks_train_and_loss_falls(tmp_path, name, overrides):
  config = tiny_config(name, **overrides)
  results = trainer.train_and_evaluate(config, str(tmp_path))
  losses = _train_losses(tmp_path)
  assert losses[-1] < losses[0], losses
  saved = json.loads((tmp_path / "results.json").read_text())
  for key in ("step", "final_train_loss", "eval_accuracy", "test_accuracy", "wall_time_s",
              "peak_memory_bytes", "config"):
    assert key in saved
  assert saved["step"] == config.num_train_steps == results["step"]
  assert 0.0 <= saved["test_accuracy"] <= 1.0 and saved["peak_memory_bytes"] > 0
  assert (tmp_path / "tensorboard").is_dir()


@pytest.mark.parametrize("name", ["lra_text", "lra_image"])
def test_tfds_tasks_train_on_mock_data(tmp_path, name):
  config = tiny_config(name)
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    trainer.train_and_evaluate(config, str(tmp_path))
  losses = _train_losses(tmp_path)
  assert losses[-1] < losses[0], losses


def test_retrieval_trains(tmp_path, retrieval_dir):
  config = tiny_config("lra_retrieval", **{"data.dir": retrieval_dir, "data.max_len": 32})
  trainer.train_and_evaluate(config, str(tmp_path / "run"))
  losses = _train_losses(tmp_path / "run")
  assert losses[-1] < losses[0], losses


def test_best_checkpoint_is_tested_and_evaluate_entry_point(tmp_path):
  config = tiny_config("lra_listops")
  results = trainer.train_and_evaluate(config, str(tmp_path))
  rows = [r for r in metrics.read(tmp_path) if r["split"] == "validation"]
  best = max(rows, key=lambda r: r["accuracy"])
  assert results["eval_accuracy"] == best["accuracy"]
  assert results["best_step"] == best["step"]
  again = evaluate_workdir(str(tmp_path), "test", checkpoint="best")
  assert again["accuracy"] == pytest.approx(results["test_accuracy"])
  assert (again["checkpoint"], again["step"]) == ("best", results["best_step"])
  last = evaluate_workdir(str(tmp_path), "test")
  assert (last["checkpoint"], last["step"]) == ("latest", 30)
  assert last["accuracy"] == pytest.approx(results["test_accuracy_last_checkpoint"])
  assert (tmp_path / "eval_test_latest_30.json").exists()
  by_step = evaluate_workdir(str(tmp_path), "test", checkpoint=30)
  assert (by_step["checkpoint"], by_step["accuracy"]) == ("step", last["accuracy"])
  with pytest.raises(FileNotFoundError, match="no checkpoint of step 7 .* steps: .*30"):
    evaluate_workdir(str(tmp_path), "test", checkpoint="7")
  # The README's command, as a user runs it.
  done = subprocess.run([sys.executable, "-m", "effx.evaluate", f"--workdir={tmp_path}",
                         "--split=test"], capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.startswith("latest checkpoint (step 30), test: accuracy"), done.stdout


def test_damaged_newest_checkpoint_falls_back_to_an_older_one(tmp_path):
  config = tiny_config("lra_listops", num_train_steps=20)
  trainer.train_and_evaluate(config, str(tmp_path))
  newest = tmp_path / "checkpoints" / "20"
  for path in (newest / "state").rglob("*"):
    if path.is_file() and "manifest" in path.name or path.suffix == ".ocdbt":
      path.write_bytes(b"garbage")
  shutil.rmtree(newest / "state" / "d", ignore_errors=True)
  config.num_train_steps = 30
  results = trainer.train_and_evaluate(config, str(tmp_path))  # resumes from step 10
  assert results["step"] == 30
  assert (tmp_path / "checkpoints" / "20.damaged").is_dir()  # set aside, not deleted
  assert (tmp_path / "checkpoints" / "30").is_dir()


@pytest.mark.parametrize("log_every", [1, 100])
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                              log_every):
  """Also when the NaN arrives between log steps: the loop checks the training loss, the
  updated parameters' norm and the validation loss before it saves a best or a regular
  checkpoint. The learning rate jumps to 1e12 after 10 good steps."""
  real = optim.schedule

  def exploding(config):
    good = real(config)
    return lambda count: jnp.where(count < 10, good(count), 1e12)

  monkeypatch.setattr(optim, "schedule", exploding)
  config = tiny_config("lra_listops", checkpoint_every_steps=1, eval_every_steps=1,
                       log_every_steps=log_every)
  diverged = r"(loss|param_norm|validation loss) is (nan|inf) at step 1\d.*step 10\)"
  with pytest.raises(FloatingPointError, match=diverged):
    trainer.train_and_evaluate(config, str(tmp_path))
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 10  # no diverged state was saved over the good one
  for path in sorted((tmp_path / "best").iterdir()):
    params = ocp.StandardCheckpointer().restore(path / "params")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), path
  sessions = json.loads((tmp_path / "sessions.json").read_text())
  assert [(s["step"], s["status"]) for s in sessions] == [(10, "failed")]


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


def test_a_workdir_holds_one_run(tmp_path):
  """A config that would change the results is refused, naming every differing key and
  touching nothing; harmless changes resume and are recorded per session."""
  config = tiny_config("lra_listops", num_train_steps=10, checkpoint_every_steps=10)
  trainer.train_and_evaluate(config, str(tmp_path))
  before = {p: (tmp_path / p).read_bytes() for p in _listing(tmp_path)
            if (tmp_path / p).is_file()}
  local = tiny_config("lra_listops", num_train_steps=10, checkpoint_every_steps=10,
                      **{"model.attention": "local", "learning_rate": 0.1})
  with pytest.raises(workdir_lib.ConfigMismatchError) as error:
    trainer.train_and_evaluate(local, str(tmp_path))
  message = str(error.value)
  assert "model.attention: 'dense' (stored) -> 'local' (now)" in message
  assert "learning_rate: 0.003 (stored) -> 0.1 (now)" in message
  assert f"--config.init_checkpoint={tmp_path}" in message
  other_task = tiny_config("lra_pathfinder", num_train_steps=10)
  with pytest.raises(workdir_lib.ConfigMismatchError, match="data.task: 'listops'"):
    trainer.train_and_evaluate(other_task, str(tmp_path))
  after = {p: (tmp_path / p).read_bytes() for p in _listing(tmp_path) if (tmp_path / p).is_file()}
  assert after == before  # nothing renamed, rewritten or deleted

  longer = tiny_config("lra_listops", num_train_steps=20, checkpoint_every_steps=10,
                       eval_every_steps=5)
  results = trainer.train_and_evaluate(longer, str(tmp_path))
  assert results["step"] == 20
  sessions = json.loads((tmp_path / "sessions.json").read_text())
  assert [(s["start_step"], s["step"], s["status"]) for s in sessions] == [
      (0, 10, "finished"), (10, 20, "finished")]
  assert sessions[1]["config_changes"] == {
      "eval_every_steps": {"stored": 15, "now": 5},
      "num_train_steps": {"stored": 10, "now": 20}}
  assert results["wall_time_s"] == pytest.approx(sum(s["wall_time_s"] for s in sessions))
  assert results["sessions"] == sessions
  assert json.loads((tmp_path / "config.json").read_text())["num_train_steps"] == 20


def test_a_checkpoint_of_another_model_is_not_called_damaged(tmp_path):
  trainer.train_and_evaluate(tiny_config("lra_listops", num_train_steps=10), str(tmp_path))
  (tmp_path / "config.json").unlink()  # as if written by a version that kept no config
  wider = tiny_config("lra_listops", num_train_steps=10, **{"model.emb_dim": 48,
                                                            "model.qkv_dim": 48})
  with pytest.raises(ckpt.StructureMismatchError,
                     match=r"holds a different model.*\n  params/encoder/embed/cls: stored "
                           r"\(32,\), model \(48,\)"):
    trainer.train_and_evaluate(wider, str(tmp_path))
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10"]  # not moved


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


def test_a_resumed_run_logs_each_step_once(tmp_path):
  """Rows of steps a killed session ran past its last checkpoint are dropped on resume
  and redone; metrics.jsonl and TensorBoard hold each (split, step) once."""
  config = tiny_config("lra_listops", num_train_steps=20, checkpoint_every_steps=10,
                       eval_every_steps=10, log_every_steps=5)
  trainer.train_and_evaluate(config, str(tmp_path))
  shutil.rmtree(tmp_path / "checkpoints" / "20")  # the session died before saving step 20
  trainer.train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  keys = [(r["split"], r["step"]) for r in rows]
  assert sorted(keys) == sorted(set(keys))
  assert sorted(keys) == [("test", 20), ("train", 5), ("train", 10), ("train", 15),
                          ("train", 20), ("validation", 10), ("validation", 20)]
  files, scalars = _tensorboard_scalars(tmp_path)
  assert len(files) == 1
  tags = [tag_step for tag_step, _ in scalars]
  assert len(tags) == len(set(tags))
  assert dict(scalars)[("train/loss", 15)] == pytest.approx(
      next(r["loss"] for r in rows if (r["split"], r["step"]) == ("train", 15)))
  assert {step for (tag, step) in tags if tag.startswith("validation/")} == {10, 20}


def test_init_checkpoint_starts_from_another_runs_params(tmp_path):
  first = tiny_config("lra_listops", num_train_steps=10)
  trainer.train_and_evaluate(first, str(tmp_path / "a"))
  second = tiny_config("lra_listops", num_train_steps=1, learning_rate=0.0, warmup_steps=0,
                       init_checkpoint=str(tmp_path / "a"))
  trainer.train_and_evaluate(second, str(tmp_path / "b"))
  a = evaluate_workdir(str(tmp_path / "a"), "validation")
  b = evaluate_workdir(str(tmp_path / "b"), "validation")
  assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
  assert not np.isnan(a["loss"])
  assert os.path.isdir(tmp_path / "b" / "checkpoints" / "1")


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
  results = {}
  for accumulate in (1, 2):
    config = tiny_config("lra_listops", num_train_steps=3, grad_accum_steps=accumulate,
                         eval_every_steps=3, checkpoint_every_steps=3)
    trainer.train_and_evaluate(config, str(tmp_path / str(accumulate)))
    results[accumulate] = evaluate_workdir(str(tmp_path / str(accumulate)), "validation")
  assert results[2]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)


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


def test_user_errors_print_one_line(tmp_path):
  """From the command line a user error is one line on stderr and status 1, with no
  traceback, no config dump and no workdir; EFFX_TRACEBACK=1 shows the traceback."""
  base = [sys.executable, "-m", "effx.train", f"--config={CONFIGS / 'lra_listops.py'}:tiny",
          f"--workdir={tmp_path / 'run'}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  for bad, says in [("--config.batch_sise=3", "unknown key config.batch_sise"),
                    ("--config.model.attention=nope", "unknown attention family 'nope'")]:
    done = subprocess.run([*base, bad], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if not line.startswith(("I", "W"))]
    assert errors[0].startswith("error: ") and says in errors[0], done.stderr[-3000:]
    assert errors[1:] == ["(EFFX_TRACEBACK=1 shows the traceback)"], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "config:" not in done.stderr
    assert not (tmp_path / "run").exists()
  done = subprocess.run([*base, "--config.batch_sise=3"], capture_output=True, text=True,
                        timeout=300, env={**env, "EFFX_TRACEBACK": "1"})
  assert done.returncode != 0 and "Traceback" in done.stderr


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


def test_no_restorable_checkpoint_stops_instead_of_starting_over(tmp_path):
  config = tiny_config("lra_listops", num_train_steps=20)
  trainer.train_and_evaluate(config, str(tmp_path))
  for step in ("10", "20"):
    for path in (tmp_path / "checkpoints" / step / "state").rglob("*"):
      if path.is_file():
        path.write_bytes(b"garbage")
  before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  with pytest.raises(ckpt.CheckpointError, match="no checkpoint in .* restores .nothing was"):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
  shutil.rmtree(tmp_path / "checkpoints")  # gone altogether: the run's history says 20
  with pytest.raises(ckpt.CheckpointError, match="reached step 20 .* but no checkpoint"):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / "results.json").exists()


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


def test_old_workdirs_evaluate_and_pruning_length_is_not_harmless(tmp_path):
  config = tiny_config("lra_listops", num_train_steps=10)
  trainer.train_and_evaluate(config, str(tmp_path / "old"))
  stored = json.loads((tmp_path / "old" / "config.json").read_text())
  del stored["distill"], stored["prune"]  # a run made before these sections existed
  (tmp_path / "old" / "config.json").write_text(json.dumps(stored))
  assert evaluate_workdir(str(tmp_path / "old"), "test")["step"] == 10
  longer = tiny_config("lra_listops", num_train_steps=20)
  assert trainer.train_and_evaluate(longer, str(tmp_path / "old"))["step"] == 20
  pruned = tiny_config("lra_listops", num_train_steps=10, **{"prune.method": "magnitude"})
  trainer.train_and_evaluate(pruned, str(tmp_path / "pruned"))
  pruned.num_train_steps = 20  # pruning ends at 80% of training: the schedule would move
  with pytest.raises(workdir_lib.ConfigMismatchError, match="num_train_steps: 10"):
    trainer.train_and_evaluate(pruned, str(tmp_path / "pruned"))


def test_a_new_validation_subset_revalidates_the_best_checkpoint(tmp_path):
  """The best value a resumed run compares with is measured on its own subset."""
  config = tiny_config("lra_listops", num_train_steps=10, eval_every_steps=5,
                       checkpoint_every_steps=5, max_eval_examples=16)
  trainer.train_and_evaluate(config, str(tmp_path))
  config.update(num_train_steps=15, max_eval_examples=48)
  results = trainer.train_and_evaluate(config, str(tmp_path))
  run = trainer.Run(config, evaluation_only=True)
  checkpoints = ckpt.Checkpoints(str(tmp_path), 3)
  best = checkpoints.restore_best({"params": run.abstract_state.params,
                                   "model_state": run.abstract_state.model_state},
                                  results["best_step"])
  checkpoints.close()
  on_48 = run.evaluate(best["params"], best["model_state"], "validation", limit=48)
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

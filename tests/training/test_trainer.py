"""The training loop in-process: every task trains, bad input fails early, damaged or
diverging runs keep what was saved."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from effx import cli, metrics, trainer
from effx.evaluate import evaluate_workdir
from conftest import tiny_config


def _train_losses(workdir):
  return [r["loss"] for r in metrics.read(workdir) if r["split"] == "train"]


@pytest.mark.parametrize("name,overrides", [
    ("lra_listops", {}),
    ("lra_listops", {"model.dtype": "bfloat16"}),
    ("lra_pathfinder", {"data.num_train": 16, "data.num_valid": 16, "data.num_test": 16}),
    ("lra_pathx", {"data.num_train": 8, "data.num_valid": 8, "data.num_test": 8,
                   "num_train_steps": 20, "batch_size": 4}),
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
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, log_every):
  """Also when the NaN arrives between log steps: the loop checks the training loss, the
  updated parameters' norm and the validation loss before it saves a best or a regular
  checkpoint."""
  trainer.train_and_evaluate(tiny_config("lra_listops", num_train_steps=10), str(tmp_path))
  best = sorted((tmp_path / "best").iterdir())
  config = tiny_config("lra_listops", learning_rate=1e12, checkpoint_every_steps=1,
                       eval_every_steps=1, log_every_steps=log_every)
  diverged = r"(loss|param_norm|validation loss) is (nan|inf) at step 1\d.*step 10\)"
  with pytest.raises(FloatingPointError, match=diverged):
    trainer.train_and_evaluate(config, str(tmp_path))
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 10  # no diverged state was saved over the good one
  for path in sorted((tmp_path / "best").iterdir()):
    if path not in best:
      params = ocp.StandardCheckpointer().restore(path / "params")
      assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), path


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
  trainer.check_config(config)


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
    trainer.check_config(config)


def test_unknown_top_level_key():
  config = tiny_config("lra_listops")
  with config.unlocked():
    config.lr = 0.1
  with pytest.raises(ValueError, match="unknown config key.*config.lr"):
    trainer.check_config(config)


def test_unwritable_workdir_and_missing_dataset(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(PermissionError, match="not writable"):
    trainer.train_and_evaluate(tiny_config("lra_listops"), str(blocker / "run"))
  with pytest.raises(FileNotFoundError, match="download_and_prepare"):
    trainer.train_and_evaluate(tiny_config("lra_text", **{"data.dir": str(tmp_path)}),
                               str(tmp_path / "run"))


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
  writer = metrics.Writer(str(tmp_path))  # the resumed run
  writer.write(2, "train", {"loss": 1.5})
  writer.close()
  assert [(r["step"], r["loss"]) for r in metrics.read(str(tmp_path))] == [(1, 2.0), (2, 1.5)]


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

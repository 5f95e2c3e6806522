"""The training entry point in subprocesses: exact resume after SIGKILL, sharding that
does not change the math, and two processes training together through jax.distributed."""

import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from effx.training import metrics

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = [f"--config={ROOT / 'configs' / 'lra_listops.py'}:tiny", "--config.log_every_steps=1",
        "--config.max_eval_examples=16", "--config.data.num_train=200"]


def _env(devices=1, **extra):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices), **extra}
  env.pop("XLA_FLAGS", None)
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  return env


def _train(workdir, *args, devices=1, **popen):
  cmd = [sys.executable, "-m", "effx.train", f"--workdir={workdir}", *TINY, *args]
  return subprocess.Popen(cmd, cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **popen)


def _finish(process, timeout=300):
  out, _ = process.communicate(timeout=timeout)
  assert process.returncode == 0, out[-3000:]
  return out


def _final_state(workdir, step):
  return ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / "checkpoints" / str(step)
                                            / "state")


def test_killed_run_resumes_bit_for_bit(tmp_path):
  args = ["--config.num_train_steps=40", "--config.checkpoint_every_steps=5",
          "--config.eval_every_steps=10"]  # dropout stays on (0.1): masks must replay
  _finish(_train(tmp_path / "straight", *args))

  kill_at = random.Random().randrange(8, 33)
  process = _train(tmp_path / "killed", *args)
  jsonl = tmp_path / "killed" / "metrics.jsonl"
  committed = tmp_path / "killed" / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    # Saves are asynchronous: wait for a committed step as well, else the kill can land
    # before the first commit and the rerun would (rightly) start from scratch.
    if (jsonl.exists() and committed.exists()
        and any(d.name.isdigit() for d in committed.iterdir())
        and any(json.loads(line)["step"] >= kill_at
                for line in jsonl.read_text().splitlines())):
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  out = _finish(_train(tmp_path / "killed", *args))
  assert "resumed from" in out, f"killed at step {kill_at} but did not resume"

  a, b = _final_state(tmp_path / "straight", 40), _final_state(tmp_path / "killed", 40)
  for x, y in zip(jax_leaves(a), jax_leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=f"killed at step {kill_at}")
  ra = json.loads((tmp_path / "straight" / "results.json").read_text())
  rb = json.loads((tmp_path / "killed" / "results.json").read_text())
  for key in ("final_train_loss", "eval_accuracy", "best_step", "test_accuracy"):
    assert ra[key] == rb[key], (key, kill_at)
  timing = ("steps_per_s", "examples_per_s")
  rows = [[{k: v for k, v in r.items() if k not in timing} for r in metrics.read(tmp_path / w)]
          for w in ("straight", "killed")]
  assert rows[0] == rows[1]  # every logged loss and accuracy, bit for bit
  # ... each (split, step) once in the file itself, and the killed session's time counted.
  lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
  assert len(lines) == len({(r["split"], r["step"]) for r in lines}) == len(rows[1])
  sessions = json.loads((tmp_path / "killed" / "sessions.json").read_text())
  assert [s["status"] for s in sessions] == ["killed", "finished"]
  assert rb["wall_time_s"] == pytest.approx(sum(s["wall_time_s"] for s in sessions))


def jax_leaves(tree):
  import jax

  return jax.tree.leaves(tree)


def _losses(workdir):
  return np.array([r["loss"] for r in metrics.read(workdir) if r["split"] == "train"])


SHARD_ARGS = ["--config.num_train_steps=6", "--config.model.dropout_rate=0.0",
              "--config.model.attention_dropout_rate=0.0", "--config.model.num_heads=2",
              "--config.model.mlp_dim=64", "--config.eval_every_steps=6",
              "--config.checkpoint_every_steps=6"]


def test_sharding_is_invisible_to_the_math(tmp_path):
  one = _train(tmp_path / "one", *SHARD_ARGS)
  out = _finish(_train(tmp_path / "eight", *SHARD_ARGS, "--config.mesh.data=4",
                       "--config.mesh.model=2", devices=8))
  _finish(one)
  assert "'data': 4, 'model': 2" in out and "8 devices" in out
  np.testing.assert_allclose(_losses(tmp_path / "eight"), _losses(tmp_path / "one"),
                             rtol=2e-5)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_hosts(workdir, *args):
  port = _free_port()
  procs = [_train(workdir, *SHARD_ARGS, *args, f"--coordinator_address=127.0.0.1:{port}",
                  "--num_processes=2", f"--process_id={i}", devices=2) for i in range(2)]
  return [_finish(p) for p in procs]


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(tmp_path):
  single = _train(tmp_path / "single", *SHARD_ARGS, "--config.mesh.model=2", devices=4)
  outs = _two_hosts(tmp_path / "multi", "--config.mesh.model=2")
  assert all("4 devices" in out for out in outs)
  _finish(single)
  # Each host fed half of every global batch; together they match one 4-device process.
  np.testing.assert_allclose(_losses(tmp_path / "multi"), _losses(tmp_path / "single"),
                             rtol=2e-5)
  outs = _two_hosts(tmp_path / "multi", "--config.mesh.model=2", "--config.num_train_steps=10",
                    "--config.checkpoint_every_steps=5", "--config.eval_every_steps=5")
  assert all("resumed from" in out for out in outs)
  results = json.loads((tmp_path / "multi" / "results.json").read_text())
  assert results["step"] == 10 and results["devices"].startswith("4 x")


@pytest.mark.slow
def test_a_signal_to_one_host_stops_every_host_at_the_same_step(tmp_path):
  """Saving is collective: SIGTERM to process 0 alone must stop both processes at one
  agreed step with one checkpoint (not deadlock), and the rerun finishes."""
  port = _free_port()
  args = [*SHARD_ARGS, "--config.mesh.model=2", "--config.num_train_steps=100000",
          "--config.checkpoint_every_steps=100000", "--config.eval_every_steps=100000",
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  procs = [_train(tmp_path, *args, f"--process_id={i}", devices=2) for i in range(2)]
  _wait_for_training(tmp_path)
  procs[0].send_signal(signal.SIGTERM)
  outs = [_finish(p, timeout=240) for p in procs]
  assert "SIGTERM: checkpointed step" in outs[0]
  assert "a signal to another process: checkpointed step" in outs[1]
  saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(saved) == 1 and all(f"checkpointed step {saved[0]} " in o for o in outs)


def _wait_for_training(workdir):
  jsonl = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (jsonl.exists() and len(jsonl.read_text()) > 0):
    time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_the_rerun_finishes(tmp_path, sig):
  """SIGTERM (preemption) and SIGINT (Ctrl-C) checkpoint the current step and exit with
  one line saying how to resume; the rerun resumes from that step."""
  args = ["--config.checkpoint_every_steps=100000", "--config.eval_every_steps=100000"]
  process = _train(tmp_path, *args, "--config.num_train_steps=100000")
  _wait_for_training(tmp_path)
  process.send_signal(sig)
  out = _finish(process)
  assert f"{sig.name}: checkpointed step" in out and "rerun the same command" in out
  assert "Traceback" not in out
  saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(saved) == 1 and 0 < saved[0] < 100000
  assert not (tmp_path / "results.json").exists()
  out = _finish(_train(tmp_path, *args, f"--config.num_train_steps={saved[0] + 5}"))
  assert f"resumed from {tmp_path / 'checkpoints'} at step {saved[0]}" in out
  assert json.loads((tmp_path / "results.json").read_text())["step"] == saved[0] + 5


def test_second_ctrl_c_keeps_checkpoints_readable(tmp_path):
  """Two Ctrl-C in quick succession: the process exits (at once, when the second lands
  while the first is being handled) and what was committed restores: the rerun resumes
  from it, or starts afresh, and finishes. (The exit itself: test_trainer.py.)"""
  args = ["--config.checkpoint_every_steps=5", "--config.eval_every_steps=100000"]
  process = _train(tmp_path, *args, "--config.num_train_steps=100000")
  _wait_for_training(tmp_path)
  time.sleep(2)
  process.send_signal(signal.SIGINT)
  time.sleep(0.05)
  if process.poll() is None:
    process.send_signal(signal.SIGINT)
  out, _ = process.communicate(timeout=120)
  assert process.returncode in (0, 128 + signal.SIGINT), out[-3000:]
  assert "Traceback" not in out
  saved = max([int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()],
              default=0)
  out = _finish(_train(tmp_path, *args, f"--config.num_train_steps={saved + 5}"))
  assert "failed to restore" not in out
  assert json.loads((tmp_path / "results.json").read_text())["step"] == saved + 5

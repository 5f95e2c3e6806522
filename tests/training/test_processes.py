"""The training entry point in subprocesses: a run stopped by SIGTERM, Ctrl-C and SIGKILL
resumes bit for bit (a second trainer meanwhile is refused); sharding over devices and processes does not change the math; a
signal to one of two processes stops both at one step, and they resume.

Each ``python -m effx.train`` pays a few seconds of imports (its compiles are shared
between runs of one program by the session's compilation cache, tests/conftest.py), so
one run is stopped several ways and one two-process run is signalled and resumed, rather
than a run per property; the one-device reference of the sharding tests trains in this process."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import free_port, stand_in_cluster

from effx.training import metrics

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = [f"--config={ROOT / 'configs' / 'lra_listops.py'}:tiny", "--config.log_every_steps=1",
        "--config.max_eval_examples=16", "--config.data.num_train=200"]
FOREVER = "--config.num_train_steps=100000"  # a run that only a signal ends


def _env(devices=1, **extra):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices), **extra}
  # The session's compile flags (tests/conftest.py), as this process's reference run has
  # them, less any device count of the caller's: JAX_NUM_CPU_DEVICES sets it.
  env["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                              if "device_count" not in f)
  return env


def _train(workdir, *args, devices=1, env=None):
  cmd = [sys.executable, "-m", "effx.train", f"--workdir={workdir}", *TINY, *args]
  return subprocess.Popen(cmd, cwd=ROOT, env=_env(devices, **(env or {})),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process, timeout=300):
  out, _ = process.communicate(timeout=timeout)
  assert process.returncode == 0, out[-3000:]
  return out


def _final_state(workdir, step):
  return ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / "checkpoints" / str(step)
                                            / "state")


def _train_steps(workdir) -> list[int]:
  """The training steps logged so far (a line being written is skipped)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  steps = []
  for line in path.read_text().splitlines() if path.exists() else []:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if row["split"] == "train":
      steps.append(row["step"])
  return steps


def _committed(workdir) -> list[int]:
  """Steps of the committed checkpoints (orbax writes a step under a temporary name)."""
  folder = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) \
      if folder.exists() else []


def _wait(process, done, what, timeout=240):
  deadline = time.time() + timeout
  while not done():
    if process.poll() is not None:
      pytest.fail(f"the run ended ({process.returncode}) before {what}:\n"
                  f"{process.communicate()[0][-3000:]}")
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.05)


def _wait_for_step(workdir, process, step):
  _wait(process, lambda: max(_train_steps(workdir), default=0) >= step,
        f"training step {step}")


def jax_leaves(tree):
  import jax

  return jax.tree.leaves(tree)


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_ctrl_c_and_sigkill_ends_as_a_straight_run(tmp_path):
  """One run stopped three ways, rerun after each: SIGTERM (preemption) checkpoints the
  current step and exits with one line saying how to resume; two quick Ctrl-C exit (at
  once when the second lands while the first is being handled) and what was committed
  restores; SIGKILL loses the steps since the last checkpoint. The last rerun ends
  exactly where a straight run of as many steps ends: the final state, every logged
  loss and accuracy, and the results (dropout stays on (0.1): its masks must replay)."""
  work, ckpts = tmp_path / "stopped", tmp_path / "stopped" / "checkpoints"
  args = ["--config.eval_every_steps=10"]

  # SIGTERM, without periodic checkpoints: the one checkpoint is the signal's.
  process = _train(work, *args, FOREVER, "--config.checkpoint_every_steps=100000")
  _wait_for_step(work, process, 1)
  process.send_signal(signal.SIGTERM)
  out = _finish(process)
  [first] = _committed(work)
  assert first >= 1
  assert f"SIGTERM: checkpointed step {first} in" in out and "rerun the same command" in out
  assert "Traceback" not in out
  assert not (work / "results.json").exists()

  # Two Ctrl-C: the loop's handler takes the first (it checkpoints) and exits at once
  # on the second if it lands first.
  process = _train(work, *args, FOREVER, "--config.checkpoint_every_steps=100000")
  _wait_for_step(work, process, first + 1)
  process.send_signal(signal.SIGINT)
  time.sleep(0.05)
  if process.poll() is None:
    process.send_signal(signal.SIGINT)
  out, _ = process.communicate(timeout=120)
  assert process.returncode in (0, 128 + signal.SIGINT), out[-3000:]
  assert "Traceback" not in out
  assert f"resumed from {ckpts} at step {first}\n" in out
  # The loop's handler took SIGINT (not a KeyboardInterrupt): it checkpointed, or the
  # second one exited at once, leaving the session "running" (the next calls it killed).
  at_once = "SIGINT again: exiting now" in out
  assert at_once or "SIGINT: checkpointed step" in out, out[-3000:]
  ctrl_c = "killed" if at_once else "interrupted"

  # SIGKILL some steps after a periodic checkpoint of this session.
  newest = max(_committed(work))
  starts = [0, first, newest]
  kill_at = newest + random.Random().randrange(6, 21)
  process = _train(work, *args, FOREVER, "--config.checkpoint_every_steps=5")
  _wait(process, lambda: max(_committed(work)) > newest
        and max(_train_steps(work), default=0) >= kill_at, f"step {kill_at}")
  # A second trainer on the workdir in use is refused at once (the rerun after the
  # SIGKILL below takes the dead one's lock over).
  second = _train(work, *args, FOREVER)
  refused, _ = second.communicate(timeout=120)
  assert second.returncode == 1 and f"is in use by pid {process.pid}" in refused, refused
  process.send_signal(signal.SIGKILL)
  out, _ = process.communicate()
  assert f"resumed from {ckpts} at step {newest}\n" in out, out[-3000:]  # readable
  assert "failed to restore" not in out

  # The rerun of as many steps as a straight run, a few past the killed one's last.
  newest, end = max(_committed(work)), max(_train_steps(work)) + 3
  starts.append(newest)
  args += [f"--config.num_train_steps={end}", "--config.checkpoint_every_steps=5"]
  straight = _train(tmp_path / "straight", *args)
  out = _finish(_train(work, *args))
  _finish(straight)
  assert f"resumed from {ckpts} at step {newest}\n" in out, (kill_at, out[-3000:])

  a, b = _final_state(tmp_path / "straight", end), _final_state(work, end)
  for x, y in zip(jax_leaves(a), jax_leaves(b), strict=True):
    np.testing.assert_array_equal(x, y, err_msg=f"killed at step {kill_at}")
  ra = json.loads((tmp_path / "straight" / "results.json").read_text())
  rb = json.loads((work / "results.json").read_text())
  for key in ("step", "final_train_loss", "eval_accuracy", "best_step", "test_accuracy"):
    assert ra[key] == rb[key], (key, kill_at)
  timing = ("steps_per_s", "examples_per_s")
  rows = [[{k: v for k, v in r.items() if k not in timing} for r in metrics.read(w)]
          for w in (tmp_path / "straight", work)]
  assert len(rows[0]) > end and rows[0] == rows[1]  # every logged loss and accuracy
  # ... each (split, step) once in the file itself, and every session's time counted.
  lines = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  assert len(lines) == len({(r["split"], r["step"]) for r in lines}) == len(rows[1])
  sessions = json.loads((work / "sessions.json").read_text())
  assert [s["start_step"] for s in sessions] == starts
  assert [s["status"] for s in sessions] == ["interrupted", ctrl_c, "killed", "finished"]
  assert rb["wall_time_s"] == pytest.approx(sum(s["wall_time_s"] for s in sessions))


def _losses(workdir):
  return np.array([r["loss"] for r in metrics.read(workdir) if r["split"] == "train"])


SHARD_ARGS = ["--config.num_train_steps=6", "--config.model.dropout_rate=0.0",
              "--config.model.attention_dropout_rate=0.0", "--config.model.num_heads=2",
              "--config.model.mlp_dim=64", "--config.eval_every_steps=6",
              "--config.checkpoint_every_steps=6"]


def _two_hosts(workdir, *args):
  """Two processes of two devices each, joined by ``jax.distributed`` from flags."""
  port = free_port()
  return [_train(workdir, *SHARD_ARGS, *args, f"--coordinator_address=127.0.0.1:{port}",
                 "--num_processes=2", f"--process_id={i}", devices=2) for i in range(2)]


def test_two_processes_refused_a_workdir_in_use_stop_together(tmp_path):
  """Process 0 holds the lock for the run: when it is refused, both processes exit at
  once with the message (process 1 is told, not left waiting at a collective)."""
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom effx.common import lock\n"
       "with lock.workdir_lock(sys.argv[1], 'holder'):\n  print('held', flush=True)\n"
       "  time.sleep(120)\n", str(tmp_path / "run")], cwd=ROOT, stdout=subprocess.PIPE,
      text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    outs = [p.communicate(timeout=120)[0] for p in _two_hosts(tmp_path / "run")]
  finally:
    holder.kill()
    holder.wait()
  assert f"is in use by pid {holder.pid}" in outs[0], outs[0][-2000:]
  assert "process 0 of this run was refused its lock" in outs[1], outs[1][-2000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The training losses of ``SHARD_ARGS`` on one device, trained in this process."""
  from effx import cli
  from effx.training import loop

  _, overrides = cli.split_overrides([*TINY[1:], *SHARD_ARGS])
  config = cli.apply_overrides(cli.load_config(TINY[0].partition("=")[2]), overrides)
  workdir = tmp_path_factory.mktemp("one_device") / "run"
  loop.train_and_evaluate(config, str(workdir))
  losses = _losses(workdir)
  assert len(losses) == 6
  return losses


@pytest.mark.slow  # training runs on 1 and 8 devices
def test_sharding_is_invisible_to_the_math(tmp_path, reference):
  out = _finish(_train(tmp_path / "eight", *SHARD_ARGS, "--config.mesh.data=4",
                       "--config.mesh.model=2", devices=8))
  assert "'data': 4, 'model': 2" in out and "8 devices" in out
  np.testing.assert_allclose(_losses(tmp_path / "eight"), reference, rtol=2e-5)


@pytest.mark.slow
def test_two_processes_train_as_one_stop_together_and_resume(tmp_path, reference):
  """Two processes of two devices each (each host feeds half of every global batch)
  train the one-device losses. A SIGTERM to process 0 alone stops both processes at one
  agreed step with one checkpoint (saving is collective: no deadlock). Both resume from
  it with ``--distributed`` alone: ``jax.distributed.initialize()`` without arguments
  finds the other process from the cluster's environment (Slurm's variables, as on a
  TPU pod)."""
  multi = tmp_path / "multi"
  procs = _two_hosts(multi, "--config.mesh.model=2", FOREVER,
                     "--config.checkpoint_every_steps=100000",
                     "--config.eval_every_steps=100000")
  _wait_for_step(multi, procs[0], 1)
  procs[0].send_signal(signal.SIGTERM)
  outs = [_finish(p, timeout=240) for p in procs]
  assert all("4 devices" in out for out in outs)
  assert "SIGTERM: checkpointed step" in outs[0]
  assert "a signal to another process: checkpointed step" in outs[1]
  [stopped] = _committed(multi)
  assert all(f"checkpointed step {stopped} in" in out for out in outs)

  end = stopped + 6
  cluster = stand_in_cluster(2)
  procs = [_train(multi, *SHARD_ARGS, "--config.mesh.model=2",
                  f"--config.num_train_steps={end}", "--distributed", devices=2,
                  env={**cluster, "SLURM_PROCID": str(i)}) for i in range(2)]
  outs = [_finish(p) for p in procs]
  assert all(f"resumed from {multi / 'checkpoints'} at step {stopped}\n" in out
             and "4 devices" in out for out in outs)
  results = json.loads((multi / "results.json").read_text())
  assert results["step"] == end and results["devices"].startswith("4 x")
  # Steps 1..stopped before the signal, the rest after the resume: the reference's.
  losses = _losses(multi)
  assert len(losses) == end
  np.testing.assert_allclose(losses[:6], reference, rtol=2e-5)

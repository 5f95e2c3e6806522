"""Searches (``effx.sweep --search``): bad input and dry runs (in this process, nothing
trains), then end to end (slow): a TPE study on SQLite that prunes; a worker killed,
then a Ctrl-C, losing nothing; two Slurm array tasks sharing a study on a real
PostgreSQL server this module starts.

Every trial is a ``python -m effx.train`` subprocess of a tiny ListOps run whose
compiles are shared through the session's compilation cache."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import optuna
import pytest
from absl import flags
from conftest import CONFIGS, free_port

from effx import sweep
from effx.common import lock
from effx.launch import search

SEARCH_CONFIG = """
from effx import cli


def get_config(arg=None):
  c = cli.load_config("{configs}/lra_listops.py:tiny")
  c.update(dict(num_train_steps={steps}, eval_every_steps=10, checkpoint_every_steps=10,
                log_every_steps=5, max_eval_examples=16, warmup_steps=2,
                schedule="constant"))
  c.model.update(dropout_rate=0.0, attention_dropout_rate=0.0)
  return c


def search_lr(trial, arg=None):
  return {{"learning_rate": trial.suggest_float("learning_rate", 1e-4, 3e-2, log=True)}}


def search_typo(trial, arg=None):
  return {{"model.atention": trial.suggest_categorical("family", ["local", "dense"])}}


def search_grid(trial, arg=None):
  return {{"learning_rate": trial.suggest_categorical("learning_rate", [1e-3, 3e-3]),
          "model.num_layers": trial.suggest_int("layers", 1, 2)}}
"""


def _spec(tmp_path, steps=100):
  path = tmp_path / f"search_config_{steps}.py"
  path.write_text(SEARCH_CONFIG.format(configs=CONFIGS, steps=steps))
  return str(path)


def _here(spec, workdir, *args):
  """``python -m effx.sweep`` in this process (the trials are still subprocesses), from
  the flags' defaults (absl keeps the values of an earlier parse)."""
  for flag in flags.FLAGS.get_flags_for_module(sweep.__name__):
    flag.unparse()
  return sweep.run([f"--config={spec}", f"--workdir={workdir}", *args])


def _command(spec, workdir, *args):
  return [sys.executable, "-m", "effx.sweep", f"--config={spec}", f"--workdir={workdir}",
          *args]


def _study(workdir, storage=""):
  url = storage or f"sqlite:///{workdir}/{search.DATABASE}"
  name = json.loads((workdir / search.RECORD).read_text())["study"]
  return optuna.load_study(study_name=name, storage=url)


def test_bad_search_input_gets_one_message_each_and_writes_nothing(tmp_path, capsys):
  spec, workdir = _spec(tmp_path), tmp_path / "search"
  cases = [
      (["--search=nope", "--trials=2"], "defines no search_nope(trial, arg=None); searches "
                                        "there: grid, lr, typo"),
      (["--search=typo", "--trials=2"], "search_typo() with {'family': "),
      (["--search=lr"], "--trials=None: a search needs the number of trials"),
      (["--search=lr", "--trials=0"], "--trials=0: a search needs the number of trials"),
      (["--search=lr", "--trials=2", "--sampler=bayes"], "--sampler='bayes': one of tpe, "
                                                         "random, cmaes, grid"),
      (["--search=lr", "--trials=2", "--pruner=threshold"], "--pruner=threshold needs "
                                                            "--prune_threshold"),
      (["--search=lr", "--trials=2", "--sweep=x"], "a grid or a search, not both"),
      (["--trials=2"], "--trials belongs to a search: add --search=NAME"),
      (["--config.learning_rate=0.1"], "a grid sweep sets its values in its sweep function"),
      (["--search=lr", "--trials=2", "--config.model.atention=local"], "model.atention"),
      (["--search=lr", "--trials=2", "--launcher=tpu"], "--search runs with "
                                                        "--launcher=local or slurm"),
      (["--search=lr", "--trials=2",
        f"--storage=postgresql+psycopg://effx:secret@127.0.0.1:{free_port()}/none"],
       "--storage=postgresql+psycopg://effx:***@127.0.0.1:"),
      (["--search=lr", "--trials=2", "--worker"], "several worker processes share one "
                                                  "study through a database server"),
      (["--search=lr", "--trials=2", "--launcher=slurm",
        "--storage=postgresql+psycopg://effx:secret@h/db"], "keep it in ~/.pgpass"),
  ]
  for args, message in cases:
    assert _here(spec, workdir, *args) == 1, args
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, (args, err)
    assert "secret" not in err
  assert "model.atention" in _first_error(spec, workdir, capsys, "--search=typo", "--trials=2")
  assert not workdir.exists()


def _first_error(spec, workdir, capsys, *args):
  assert _here(spec, workdir, *args) == 1
  return capsys.readouterr().err.splitlines()[0]


def test_grid_space_dry_runs_and_the_slurm_script(tmp_path, capsys):
  spec, workdir = _spec(tmp_path), tmp_path / "search"
  assert search.grid_space(spec, "grid") == {"learning_rate": [1e-3, 3e-3], "layers": [1, 2]}
  with pytest.raises(ValueError, match=r"suggest_float\('learning_rate'\) needs step="):
    search.grid_space(spec, "lr")
  assert _here(spec, workdir, "--search=lr", "--trials=3", "--parallel=2", "--dry-run") == 0
  line = capsys.readouterr().out.strip()
  assert line.endswith("--search=lr --trials=3 --sampler=tpe --sampler_seed=0 --pruner=median "
                       "--pruner_startup_trials=5 --pruner_warmup_steps=0 "
                       "--direction=maximize --heartbeat=60 --parallel=2")
  assert _here(spec, workdir, "--search=lr", "--trials=3", "--launcher=slurm",
               "--parallel=4", "--gpus_per_node=1", "--storage=postgresql://h/db",
               "--dry-run") == 0
  script = capsys.readouterr().out
  assert "#SBATCH --array=0-3\n" in script and "#SBATCH --gpus-per-node=1\n" in script
  assert script.rstrip().splitlines()[-1].startswith("python -m effx.sweep ")
  assert script.rstrip().endswith("--storage=postgresql://h/db --parallel=1 --worker")
  assert not workdir.exists()


@pytest.mark.slow
def test_a_search_prunes_reports_and_keeps_what_ended(tmp_path, capsys):
  """TPE on SQLite, 4 trials; the median pruner (after one trial) stops the trials that
  fall below the others: SIGTERM, a checkpoint, recorded as pruned with the last value.
  A rerun keeps what ended and trains nothing."""
  spec, workdir = _spec(tmp_path), tmp_path / "search"
  args = ("--search=lr", "--trials=4", "--pruner_startup_trials=1")
  assert _here(spec, workdir, *args) == 0
  out = capsys.readouterr().out
  study = _study(workdir)
  trials = study.get_trials()
  states = [t.state.name for t in trials]
  assert len(trials) == 4 and "PRUNED" in states and "COMPLETE" in states, states
  for t in trials:
    run = workdir / t.user_attrs["workdir"]
    assert run.name == f"trial-{t.number:04d}"
    config = json.loads((run / "config.json").read_text())
    assert config["learning_rate"] == t.params["learning_rate"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    seen = {r["step"]: r["accuracy"] for r in rows if r["split"] == "validation"}
    assert t.intermediate_values == seen  # every evaluation reported, nothing else
    if t.state.name == "COMPLETE":
      results = json.loads((run / "results.json").read_text())
      assert t.value == results["eval_accuracy"] == t.user_attrs["results"]["eval_accuracy"]
    else:  # stopped early with its checkpoint, its last reported value kept
      step = t.user_attrs["pruned_at"]
      assert step < 100 and not (run / "results.json").exists()
      assert t.value == seen[max(seen)] and max(seen) >= step
      assert any(p.name.isdigit() for p in (run / "checkpoints").iterdir())
  best = study.best_trial
  table = (workdir / "results.md").read_text()
  assert f"**Best: trial {best.number}**" in table and f"**Best: trial {best.number}**" in out
  assert f"| {trials[-1].number} | {states[-1].lower()} |" in table
  assert "pruned at step" in table
  for name in ("history", "slice", "importances", "intermediate"):
    assert (workdir / f"{name}.png").stat().st_size > 0, name
  assert (workdir / "results.csv").read_text().count("\n") == 5
  # Rerunning the finished search trains nothing and keeps every trial as it was.
  before = {t.number: (t.state, t.value, t.params) for t in trials}
  mtimes = {p: p.stat().st_mtime for p in workdir.glob("trial-*/metrics.jsonl")}
  assert _here(spec, workdir, *args) == 0
  assert {t.number: (t.state, t.value, t.params) for t in _study(workdir).get_trials()} == before
  assert {p: p.stat().st_mtime for p in workdir.glob("trial-*/metrics.jsonl")} == mtimes
  # Another search (or a grid) in the same folder is refused.
  capsys.readouterr()
  assert _here(spec, workdir, "--search=grid", "--trials=1") == 1
  assert "holds the search lr of" in capsys.readouterr().err


def _wait(predicate, process, what, timeout=240):
  deadline = time.time() + timeout
  while not predicate():
    if process.poll() is not None:
      raise AssertionError(f"ended ({process.returncode}) before {what}: "
                           f"{process.communicate()[1][-3000:]}")
    assert time.time() < deadline, what
    time.sleep(0.05)


def _last_train_step(run):
  path = run / "metrics.jsonl"
  if not path.exists():
    return 0
  steps = [json.loads(line)["step"] for line in path.read_text().splitlines()
           if line.endswith("}") and '"train"' in line]
  return max(steps, default=0)


@pytest.mark.slow
def test_a_killed_worker_then_ctrl_c_lose_no_trial_and_run_none_twice(tmp_path):
  """A worker is SIGKILLed mid-trial (its trainer gets SIGHUP and checkpoints); the
  rerun finds the trial stale (its heartbeat stopped), queues it again with its own
  parameters and resumes its workdir; Ctrl-C of that rerun queues it once more; the
  third run finishes it. One trial, one workdir, three sessions."""
  # 150 steps: the first run is killed after its checkpoint at 10 and the second
  # interrupted ~10 steps after it resumed, so the trial is still running at both signals
  # with 100 steps to spare; the third run finishes it.
  spec, workdir = _spec(tmp_path, steps=150), tmp_path / "search"
  command = _command(spec, workdir, "--search=lr", "--trials=1", "--heartbeat=1")
  run = workdir / "trial-0000"
  # pytest-xdist workers ignore SIGINT and children inherit that: give the sweep the
  # default handler a terminal would.
  terminal = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
  first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, preexec_fn=terminal)  # noqa: PLW1509
  _wait(lambda: (run / "checkpoints" / "10").exists(), first, "a first checkpoint")
  first.kill()
  first.communicate()
  with open(run / lock.NAME) as f:  # the orphaned trainer checkpoints and exits
    deadline = time.time() + 120
    while True:
      try:
        import fcntl  # noqa: PLC0415
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(f, fcntl.LOCK_UN)
        break
      except BlockingIOError:
        assert time.time() < deadline
        time.sleep(0.1)
  killed_at = _last_train_step(run)
  assert "SIGHUP: checkpointed step" in (workdir / "logs" / "trial-0000.log").read_text()
  time.sleep(2.5)  # two heartbeats without a beat: stale

  second = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=terminal)  # noqa: PLW1509
  _wait(lambda: _last_train_step(run) > killed_at + 10, second, "the resumed trial trains")
  second.send_signal(signal.SIGINT)
  _, err = second.communicate(timeout=120)
  assert second.returncode == 130, err[-3000:]
  assert "interrupted: rerun the same command to continue the study" in err
  trials = _study(workdir).get_trials()
  assert [t.state.name for t in trials] == ["FAIL", "FAIL", "WAITING"]
  assert trials[1].user_attrs["error"] == "interrupted (queued again)"

  third = subprocess.run(command, capture_output=True, text=True, timeout=300)
  assert third.returncode == 0, third.stderr[-3000:]
  trials = _study(workdir).get_trials()
  assert [t.state.name for t in trials] == ["FAIL", "FAIL", "COMPLETE"]
  assert len({t.params["learning_rate"] for t in trials}) == 1  # never sampled again
  assert {t.user_attrs["workdir"] for t in trials} == {"trial-0000"}
  assert trials[2].system_attrs["retry_history"] == [0, 1]
  assert sorted(p.name for p in workdir.glob("trial-*")) == ["trial-0000"]
  results = json.loads((run / "results.json").read_text())
  assert results["step"] == 150 and len(results["sessions"]) == 3
  assert trials[2].value == results["eval_accuracy"]
  table = (workdir / "results.md").read_text()
  assert "| 0 | fail |" in table
  assert "its worker stopped (no heartbeat); continued by trial 1" in table
  assert "interrupted; continued by trial 2" in table and "| 2 | complete |" in table


# --- PostgreSQL ------------------------------------------------------------------------

def _postgres_bin():
  found = shutil.which("pg_ctl")
  if found:
    return pathlib.Path(found).resolve().parent
  versions = sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
  return versions[-1].parent if versions else None


@pytest.fixture
def postgres():
  """A PostgreSQL server of this test: a fresh cluster in a temporary folder on a free
  local port, stopped and deleted after. Run as the ``postgres`` user when the tests run
  as root (the server refuses root)."""
  bin_dir = _postgres_bin()
  if bin_dir is None:
    pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
  folder = pathlib.Path(tempfile.mkdtemp(prefix="effx-postgres-"))
  as_user = []
  if os.geteuid() == 0:
    import pwd  # noqa: PLC0415

    user = pwd.getpwnam("postgres")
    os.chown(folder, user.pw_uid, user.pw_gid)
    as_user = ["runuser", "-u", "postgres", "--"]
  data, port = folder / "data", free_port()

  def run(*argv, check=True):
    subprocess.run([*as_user, *argv], check=check, capture_output=True, timeout=120)

  try:
    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "effx", "--auth=trust", "-E", "UTF8")
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w",
        "-o", f"-k {folder} -p {port} -c listen_addresses=127.0.0.1", "start")
    yield f"postgresql+psycopg://effx@127.0.0.1:{port}/postgres"
  finally:
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop", check=False)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_slurm_workers_share_a_postgresql_study(tmp_path, postgres, monkeypatch, capsys):
  """``--launcher=slurm`` writes one array task per worker; two tasks run at once (a
  stand-in sbatch records the script, which runs here) on one study in PostgreSQL, a
  grid of 4 points: each run once, every result recorded (the grid's end is not an
  error); the report reads the database."""
  spec, workdir = _spec(tmp_path), tmp_path / "search"
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "sbatch").write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/submitted"\n'
                                  'echo "Submitted batch job 42"\n')
  (bin_dir / "sbatch").chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.path.dirname(sys.executable)}:"
                             f"{os.environ['PATH']}")
  args = ("--search=grid", "--sampler=grid", "--trials=4", f"--storage={postgres}",
          "--pruner=none", "--config.max_eval_examples=8", "--config.num_train_steps=20")
  assert _here(spec, workdir, *args, "--launcher=slurm", "--parallel=2",
               "--gpus_per_node=0") == 0
  assert "Submitted batch job 42" in capsys.readouterr().out
  script = (workdir / "slurm" / "search.sbatch").read_text()
  assert (bin_dir / "submitted").read_text().strip() == str(workdir / "slurm" / "search.sbatch")
  tasks = [subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SLURM_ARRAY_TASK_ID": str(i)})
           for i in range(2)]
  for task in tasks:
    _, err = task.communicate(timeout=400)
    assert task.returncode == 0, err[-3000:]
  trials = _study(workdir, postgres).get_trials()
  assert [t.state.name for t in trials] == ["COMPLETE"] * 4
  assert sorted(t.user_attrs["workdir"] for t in trials) == [
      "trial-0000", "trial-0001", "trial-0002", "trial-0003"]
  assert sorted((t.params["learning_rate"], t.params["layers"]) for t in trials) == [
      (1e-3, 1), (1e-3, 2), (3e-3, 1), (3e-3, 2)]
  for t in trials:
    results = json.loads((workdir / t.user_attrs["workdir"] / "results.json").read_text())
    assert len(results["sessions"]) == 1 and t.value == results["eval_accuracy"]
    assert results["config"]["max_eval_examples"] == 8
  assert _here(spec, workdir, *args, "--report") == 0
  assert "Trials: 4 complete." in (workdir / "results.md").read_text()
  assert f"`{postgres}`" in (workdir / "results.md").read_text()

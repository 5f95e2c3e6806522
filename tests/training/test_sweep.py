"""Sweeps: definition and checks, dry runs and the launchers' commands (fast), and end
to end (slow): the local launcher stopped by Ctrl-C, resumed, with a failed trial; a
Slurm array task; the TPU launcher with its runs in a bucket.

Every ``python -m effx.train`` a sweep starts pays a few seconds of imports (its compiles
are shared through the ``cached_compiles`` fixture): the end-to-end tests let one sweep
run check several properties, and everything that does not need a trainer runs the
sweep command in this process (``_sweep_here``)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from absl import flags
from conftest import CONFIGS, stand_in_cluster, tiny_config

from effx import sweep
from effx.launch import manifest as manifest_lib
from effx.launch import report as report_lib
from effx.launch import tpu
from effx.launch import trials as trials_lib
from effx.training import aot, defaults
from effx.training import loop as trainer

pytestmark = pytest.mark.usefixtures("cached_compiles")

SWEEP_CONFIG = """
from effx import cli


def get_config(arg=None):
  c = cli.load_config("{configs}/lra_listops.py:tiny")
  c.update(dict(num_train_steps=10, eval_every_steps=10, checkpoint_every_steps=10,
                log_every_steps=5, max_eval_examples=16, warmup_steps=2,
                schedule="constant", learning_rate=0.003))
  c.model.update(dropout_rate=0.0, attention_dropout_rate=0.0)
  return c


def sweep(add, arg=None):
  for lr in (0.001, 0.003):
    add(learning_rate=lr)


def sweep_long(add, arg=None):
  add(**{{"num_train_steps": 40, "model.attention": "local"}})  # stopped near 10
  add(init_checkpoint="{missing}")  # valid config, fails when the run starts


def sweep_typo(add, arg=None):
  add(learning_rate=0.001)
  add(**{{"model.atention": "local"}})
"""
LONG = "num_train_steps-40_attention-local"


@pytest.fixture
def spec(tmp_path):
  path = tmp_path / "sweep_config.py"
  path.write_text(SWEEP_CONFIG.format(configs=CONFIGS, missing=tmp_path / "missing"))
  return str(path)


def _sweep(spec, workdir, *args):
  return [sys.executable, "-m", "effx.sweep", f"--config={spec}", f"--workdir={workdir}",
          *args]


def _sweep_here(spec, workdir, *args):
  """``python -m effx.sweep`` run in this process (its trials are still subprocesses);
  returns the exit status. absl keeps flag values from one parse to the next, so the
  sweep's flags are set back to their defaults first."""
  for flag in flags.FLAGS.get_flags_for_module(sweep.__name__):
    flag.unparse()
  return sweep.run([f"--config={spec}", f"--workdir={workdir}", *args])


def _statuses(text):
  return [t["status"] for t in json.loads(text)["trials"]]


def test_grid_helpers_names_and_commands(spec, tmp_path):
  assert trials_lib.product(a=[1, 2], b=["x"]) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
  assert trials_lib.zipped(a=[1, 2], b=[3, 4]) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
  with pytest.raises(ValueError, match="different lengths"):
    trials_lib.zipped(a=[1], b=[2, 3])
  assert trials_lib.trial_name({"model.attention": "local", "learning_rate": 0.01}) == \
      "attention-local_learning_rate-0.01"
  trials = trials_lib.define(spec, "long")
  cmd = trials_lib.command(spec, "/runs", trials[0])
  assert cmd[1:] == ["-m", "effx.train", f"--config={spec}", f"--workdir=/runs/{LONG}",
                     "--config.num_train_steps=40", "--config.model.attention=local"]
  with pytest.raises(ValueError, match="trial 'atention-local': --config.model.atention: "
                                       "unknown key"):
    trials_lib.define(spec, "typo")
  with pytest.raises(ValueError, match="defines no sweep_nope.*sweeps there: "
                                       r"\(default\), long, typo$"):
    trials_lib.define(spec, "nope")
  # The entry point itself, once: python -m effx.sweep.
  out = subprocess.run(_sweep(spec, tmp_path / "dry", "--dry-run"), capture_output=True,
                       text=True, check=True).stdout.splitlines()
  assert [line.split()[-1] for line in out] == ["--config.learning_rate=0.001",
                                                "--config.learning_rate=0.003"]
  assert not (tmp_path / "dry").exists()


@pytest.mark.slow
def test_a_sweep_stopped_by_ctrl_c_resumes_records_its_failure_and_ends_exactly(
    spec, tmp_path, capsys):
  """Ctrl-C stops the running trial (it checkpoints) and leaves the rest; the rerun, two
  trials at a time, resumes the stopped one while the other fails (retried once, then
  recorded with its error); a further rerun skips the finished trial and retries the
  failed one; the stopped trial ends exactly where an uninterrupted run ends."""
  workdir = tmp_path / "sweep"
  # pytest-xdist workers ignore SIGINT and children inherit that: give the sweep the
  # default handler a terminal would.
  terminal = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
  process = subprocess.Popen(_sweep(spec, workdir, "--sweep=long"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=terminal)  # noqa: PLW1509 (sets one signal handler)
  first = workdir / LONG
  deadline = time.time() + 240
  while not (first / "metrics.jsonl").exists() or not (first / "metrics.jsonl").stat().st_size:
    assert time.time() < deadline and process.poll() is None, process.communicate()
    time.sleep(0.05)
  process.send_signal(signal.SIGINT)  # the first trial is training: no checkpoint yet
  _, err = process.communicate(timeout=120)
  assert process.returncode == 130, err[-3000:]
  assert "interrupted: rerun the same command to resume" in err
  assert _statuses((workdir / "sweep.json").read_text()) == ["interrupted", "pending"]
  # The sweep passed the trial a SIGTERM, and the trial checkpointed the step it was at.
  stopped = max(int(p.name) for p in (first / "checkpoints").iterdir() if p.name.isdigit())
  assert 0 < stopped < 40
  assert f"SIGTERM: checkpointed step {stopped} in" in (
      workdir / "logs" / f"{LONG}.log").read_text()

  assert _sweep_here(spec, workdir, "--sweep=long", "--parallel=2") == 1
  assert "failed: init_checkpoint" in capsys.readouterr().err
  good, bad = json.loads((workdir / "sweep.json").read_text())["trials"]
  assert good["status"] == "done" and bad["status"] == "failed"
  assert bad["attempts"] == 2 and "missing" in bad["error"]
  sessions = json.loads((first / "sessions.json").read_text())
  assert [s["start_step"] for s in sessions] == [0, stopped]
  results = json.loads((first / "results.json").read_text())
  assert good["results"]["test_accuracy"] == results["test_accuracy"]
  table = (workdir / "results.md").read_text()
  assert f"| {LONG} | 40 | local |  | done | {100 * results['test_accuracy']:.1f}%" in table
  assert f"| {bad['name']} |  |  | {tmp_path / 'missing'} | failed |  |" in table
  assert (workdir / "curves.png").stat().st_size > 0
  assert (workdir / "results.csv").read_text().count("\n") == 3
  log = workdir / "logs" / f"{bad['name']}.log"
  assert log.read_text().count("error:") == 2

  # The stopped trial's own command in another folder: a run never stopped (its
  # programs are compiled now), beside the rerun.
  trial = trials_lib.Trial(LONG, good["overrides"])
  straight = subprocess.Popen(trials_lib.command(spec, str(tmp_path / "straight"), trial),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  # Rerunning skips the finished trial (its workdir is untouched) and retries the failure.
  untouched = (first / "sessions.json").read_text()
  assert _sweep_here(spec, workdir, "--sweep=long") == 1
  assert (first / "sessions.json").read_text() == untouched
  assert json.loads((workdir / "sweep.json").read_text())["trials"][1]["attempts"] == 4
  assert log.read_text().count("error:") == 4
  # Another sweep in the same folder is refused.
  capsys.readouterr()
  assert _sweep_here(spec, workdir) == 1
  assert "holds the sweep long" in capsys.readouterr().err

  # The stopped trial ends exactly where the run never stopped ends.
  out, _ = straight.communicate(timeout=300)
  assert straight.returncode == 0, out[-3000:]
  straight = json.loads((tmp_path / "straight" / LONG / "results.json").read_text())
  for key in ("step", "final_train_loss", "eval_accuracy", "best_step", "test_accuracy"):
    assert results[key] == straight[key], key
  assert results["step"] == 40


def _stand_in_slurm(tmp_path, monkeypatch):
  """``sbatch`` (records its arguments, answers as Slurm does) and ``srun`` (runs its
  command) on the PATH, and this interpreter as the jobs' ``python``."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "sbatch").write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/submitted"\n'
                                  'echo "Submitted batch job 42"\n')
  (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')
  for tool in ("sbatch", "srun"):
    (bin_dir / tool).chmod(0o755)
  python_dir = os.path.dirname(sys.executable)
  monkeypatch.setenv("PATH", f"{bin_dir}:{python_dir}:{os.environ['PATH']}")
  return bin_dir


def test_slurm_array_script_dry_run_submission_and_refusal(spec, tmp_path, monkeypatch,
                                                           capsys):
  workdir = tmp_path / "sweep"
  assert _sweep_here(spec, workdir, "--launcher=slurm", "--parallel=2", "--nodes=2",
                     "--gpus_per_node=4", "--partition=gpu", "--dry-run") == 0
  commands = [f"python -m effx.train --config={spec} --workdir={workdir}/learning_rate-{lr} "
              f"--distributed --config.learning_rate={lr}" for lr in ("0.001", "0.003")]
  assert capsys.readouterr().out == "\n".join([
      f"# {workdir}/slurm/sweep.sbatch", "#!/bin/bash", "#SBATCH --job-name=effx-sweep",
      "#SBATCH --array=0-1%2", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
      "#SBATCH --gpus-per-node=4", "#SBATCH --time=24:00:00", "#SBATCH --partition=gpu",
      f"#SBATCH --output={workdir}/logs/slurm-%A_%a.log", "set -euo pipefail",
      f"cd {os.getcwd()}",
      "# Line SLURM_ARRAY_TASK_ID + 1 of the commands file is this task's trial.",
      f'line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {workdir}/slurm/commands.txt)',
      'srun bash -c "$line"', f"# {workdir}/slurm/commands.txt", *commands, ""])
  assert not workdir.exists()
  # Submission through a stand-in sbatch (one node per trial: no --distributed).
  bin_dir = _stand_in_slurm(tmp_path, monkeypatch)
  assert _sweep_here(spec, workdir, "--launcher=slurm", "--gpus_per_node=0") == 0
  assert "Submitted batch job 42" in capsys.readouterr().out
  assert (bin_dir / "submitted").read_text().strip() == f"{workdir}/slurm/sweep.sbatch"
  lines = (workdir / "slurm" / "commands.txt").read_text().splitlines()
  assert len(lines) == 2 and not any("--distributed" in line for line in lines)
  assert "#SBATCH --gpus-per-node" not in (workdir / "slurm" / "sweep.sbatch").read_text()
  assert _statuses((workdir / "sweep.json").read_text()) == ["submitted", "submitted"]
  # Submitted trials are submitted again only when asked, and never run here.
  assert _sweep_here(spec, workdir, "--launcher=slurm") == 1
  assert "--resubmit submits the unfinished" in capsys.readouterr().err
  assert _sweep_here(spec, workdir) == 1
  assert "2 trial(s) were submitted to Slurm" in capsys.readouterr().err
  (bin_dir / "submitted").unlink()
  assert _sweep_here(spec, workdir, "--launcher=slurm", "--resubmit") == 0
  assert (bin_dir / "submitted").exists()


@pytest.mark.slow
def test_a_slurm_array_task_runs_and_the_report_finds_it(spec, tmp_path, monkeypatch,
                                                         capsys):
  """Array task 1 of the submitted script runs through a stand-in srun; the report finds
  its results, and a resubmission submits only the unfinished trial."""
  workdir = tmp_path / "sweep"
  bin_dir = _stand_in_slurm(tmp_path, monkeypatch)
  assert _sweep_here(spec, workdir, "--launcher=slurm", "--gpus_per_node=0") == 0
  script = (workdir / "slurm" / "sweep.sbatch").read_text()
  subprocess.run(["bash", "-c", script], check=True, capture_output=True,
                 env={**os.environ, "SLURM_ARRAY_TASK_ID": "1"})
  assert _sweep_here(spec, workdir, "--report") == 0
  assert _statuses((workdir / "sweep.json").read_text()) == ["submitted", "done"]
  assert "| learning_rate-0.003 | 0.003 | done |" in (workdir / "results.md").read_text()
  capsys.readouterr()
  assert _sweep_here(spec, workdir, "--launcher=slurm", "--resubmit") == 0
  assert "Submitted batch job 42" in capsys.readouterr().out
  assert (bin_dir / "submitted").read_text().strip() == f"{workdir}/slurm/sweep.sbatch"
  assert (workdir / "slurm" / "commands.txt").read_text().splitlines() == [(
      f"python -m effx.train --config={spec} --workdir={workdir}/learning_rate-0.001 "
      "--config.learning_rate=0.001")]


def _has_libtpu():
  try:
    import libtpu  # noqa: F401
  except ImportError:
    return False
  return True


def test_topology_names_are_checked_before_anything_compiles(spec):
  with pytest.raises(ValueError, match="write a TPU generation and chip grid"):
    aot.topology_devices("v5e-16")
  if not _has_libtpu():
    with pytest.raises(OSError, match=r"needs libtpu: pip install -e '.\[tpu\]'"):
      aot.topology_devices("v5e:2x2")


@pytest.mark.skipif(not _has_libtpu(), reason="libtpu (pip install -e '.[tpu]') not installed")
def test_every_trial_compiles_for_a_tpu_topology_or_says_why_not(spec):
  trials = trials_lib.define(spec, None)
  lines = trials_lib.check_topology(spec, trials, "v5e:2x2")
  assert len(lines) == 2 and all("4 x TPU v5 lite" in line and "GiB per device of 16 GiB"
                                 in line for line in lines)
  with pytest.raises(ValueError, match="is not a TPU topology jax knows"):
    aot.topology_devices("v9z:2x2")
  config = trials_lib.trial_config(spec, {"mesh.data": 3})
  with pytest.raises(ValueError, match="does not divide the 4 devices"):
    aot.check(config, "v5e:2x2")
  # 1.3 billion parameters, replicated over a data-parallel mesh, with Adam's moments.
  big = trials_lib.trial_config(spec, {"model.emb_dim": 8192, "model.qkv_dim": 8192,
                                  "model.mlp_dim": 65536})
  with pytest.raises(ValueError, match="does not fit on v5e:2x2 .*HBM"):
    aot.check(big, "v5e:2x2")


@pytest.mark.skipif(not _has_libtpu(), reason="libtpu (pip install -e '.[tpu]') not installed")
def test_splash_attention_compiles_for_a_tpu_topology():
  """Ahead of time for v5e:2x2 from this CPU: "auto" traces local attention to splash
  (Mosaic kernels, in a shard_map over the data axis), bigbird to xla with the reason."""
  for family, want in (("local", "splash"), ("bigbird", "xla (no splash: its layout")):
    config = tiny_config("lra_listops", **{"model.attention": family, "batch_size": 8,
                                            "data.max_length": 255})  # + [CLS]: 256
    result = aot.check(config, "v5e:2x2")
    assert result["attention_backend"].startswith(want), result
    assert result["per_device_bytes"] > 0 and result["flops"] > 0


def test_tpu_launch_dry_run_and_its_bad_input(spec, tmp_path, monkeypatch, capsys):
  bucket = "gs://bucket/sweep"
  args = ["--launcher=tpu", "--tpu=effx-pod", "--zone=us-west4-a",
          "--accelerator=v5litepod-16"]
  monkeypatch.chdir(tmp_path)  # the commands do not depend on where the sweep starts
  assert _sweep_here(spec, bucket, *args, "--queued", "--project=lab", "--dry-run") == 0
  out = capsys.readouterr().out
  zone = "--zone=us-west4-a --project=lab"
  archive = f"{manifest_lib.stage(bucket)}/effx.tar.gz"
  gcloud = "gcloud compute tpus"
  trials = [f"{gcloud} tpu-vm ssh effx-pod --worker=all --command 'cd effx && python3 -m "
            f"effx.train --config=sweep_config.py --workdir={bucket}/learning_rate-{lr} "
            f"--distributed --config.learning_rate={lr}' {zone}" for lr in ("0.001", "0.003")]
  assert out.splitlines() == [
      f"# unless `{gcloud} tpu-vm describe effx-pod {zone}` finds it:",
      (f"{gcloud} queued-resources create effx-pod --node-id=effx-pod "
       f"--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite {zone}"),
      (f"# then wait until `{gcloud} queued-resources describe effx-pod "
       f"'--format=value(state.state)' {zone}` prints ACTIVE"),
      (f"tar czf {archive} --exclude=__pycache__ -C {tpu.ROOT} pyproject.toml README.md "
       f"effx configs -C {tmp_path} sweep_config.py"),
      f"{gcloud} tpu-vm scp {archive} effx-pod:effx.tar.gz --worker=all {zone}",
      (f"{gcloud} tpu-vm ssh effx-pod --worker=all --command 'rm -rf effx && mkdir effx && "
       f"tar xzf effx.tar.gz -C effx && cd effx && python3 -m pip install -q -e .[tpu]' "
       f"{zone}"),
      *trials]
  assert _sweep_here(spec, bucket, *args, "--spot", "--dry-run") == 0
  direct = capsys.readouterr().out.splitlines()
  assert direct[1] == ("gcloud compute tpus tpu-vm create effx-pod --accelerator-type="
                       "v5litepod-16 --version=v2-alpha-tpuv5-lite --spot --zone=us-west4-a")
  for bad, message in [
      ((bucket, "--launcher=tpu", "--zone=z", "--accelerator=v4-8"), "needs --tpu=NAME"),
      ((bucket, *args[:3], "--accelerator=v5e16"), "not a TPU type gcloud takes"),
      ((bucket, *args[:3], "--accelerator=v9-8"), "no default runtime image for v9"),
      ((str(tmp_path / "local"), *args), "needs --workdir=gs://BUCKET"),
      ((bucket, *args, "--parallel=2"), "one trial at a time")]:
    assert _sweep_here(spec, *bad) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
  assert not (tmp_path / "local").exists()


def test_a_sweep_over_families_and_tasks_reads_as_lra_table_one(tmp_path):
  path = tmp_path / "lra_sweep.py"
  path.write_text(f"""
def sweep(add, arg=None):
  for task in ("text", "listops"):
    for family in ("dense", "local"):
      add(**{{"config": "{CONFIGS}/lra_" + task + ".py:tiny", "model.attention": family}})
""")
  trials = trials_lib.define(str(path), None)
  assert [t.name for t in trials][:2] == ["lra_text-tiny_attention-dense",
                                          "lra_text-tiny_attention-local"]
  cmd = trials_lib.command(str(path), "/runs", trials[0])
  assert cmd[3:] == [f"--config={CONFIGS}/lra_text.py:tiny",
                     "--workdir=/runs/lra_text-tiny_attention-dense",
                     "--config.model.attention=dense"]
  workdir = tmp_path / "sweep"
  workdir.mkdir()
  manifest = manifest_lib.Manifest(str(workdir), str(path), None, trials)
  accuracy = {"lra_text-tiny_attention-dense": 0.61, "lra_text-tiny_attention-local": 0.55,
              "lra_listops-tiny_attention-dense": 0.37}
  for name, value in accuracy.items():  # three trials finished, one never ran
    (workdir / name).mkdir()
    (workdir / name / "results.json").write_text(json.dumps(
        {"test_accuracy": value, "eval_accuracy": value, "best_step": 5, "step": 10,
         "wall_time_s": 5.0, "peak_memory_bytes": 2**20}))
  manifest_lib.refresh(str(workdir), manifest)
  lines = report_lib.report(str(workdir), manifest)
  assert lines[:4] == ["| Model | ListOps | Text | Avg |", "|---|---:|---:|---:|",
                       "| dense | 37.00 | 61.00 | 49.00 |", "| local | pending | 55.00 |  |"]
  assert (workdir / "table.png").stat().st_size > 0
  assert "| lra_listops-tiny_attention-local | lra_listops.py:tiny" not in lines
  with pytest.raises(ValueError, match="a trial's config is a config file"):
    trials_lib.trial_config(str(path), {"config": 3})


@pytest.mark.slow
def test_the_tpu_launcher_runs_a_sweep_whose_runs_live_in_a_bucket(spec, bucket, tmp_path,
                                                                   monkeypatch, cached_here):
  """``--launcher=tpu`` against a stand-in ``gcloud`` whose one-worker "TPU" is a local
  folder: the TPU is created because ``describe`` fails, the packed checkout is copied
  and unpacked there, each trial runs in it with ``--distributed``, and the results in
  the bucket make the report. The workdirs are gs:// (a Cloud Storage emulator):
  checkpoints through orbax, every other file through effx.common.files; a run resumes
  from the bucket exactly."""
  from effx.common import files
  from effx.training import metrics, restore

  home, bin_dir = tmp_path / "worker", tmp_path / "bin"
  home.mkdir()
  bin_dir.mkdir()
  log = tmp_path / "gcloud.log"
  # gcloud compute tpus <tpu-vm|queued-resources> <verb> ...
  (bin_dir / "gcloud").write_text(f"""#!/bin/bash
echo "$*" >> {log}
case "$4" in
  describe) [ -f {home}/created ] ;;
  create) touch {home}/created ;;
  scp) cp "$5" {home}/effx.tar.gz ;;
  ssh) cd {home} && bash -c "$8" ;;
esac
""")
  (bin_dir / "python3").write_text(  # the worker's pip install is not repeated here
      f'#!/bin/sh\n[ "$1 $2" = "-m pip" ] && exit 0\nexec {sys.executable} "$@"\n')
  for tool in ("gcloud", "python3"):
    (bin_dir / tool).chmod(0o755)
  # One worker joins its one-process cluster with --distributed as a pod's workers do
  # (test_processes.py runs two), from the unpacked checkout alone (no PYTHONPATH).
  for name, value in {**stand_in_cluster(1), "SLURM_PROCID": "0", "PYTHONPATH": "",
                      "PATH": f"{bin_dir}:{os.environ['PATH']}"}.items():
    monkeypatch.setenv(name, value)
  workdir = f"{bucket}/tpu_sweep"
  tpu_args = ["--launcher=tpu", "--tpu=pod", "--zone=z", "--accelerator=v4-8"]
  assert _sweep_here(spec, workdir, *tpu_args) == 0
  verbs = [line.split()[3] for line in log.read_text().splitlines()]
  assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh"]
  manifest = json.loads(files.read_text(f"{workdir}/sweep.json"))
  assert [t["status"] for t in manifest["trials"]] == ["done", "done"]
  assert (home / "effx" / "effx" / "launch" / "tpu.py").exists()
  table = files.read_text(f"{workdir}/results.md")
  for lr in ("0.001", "0.003"):
    assert f"| learning_rate-{lr} | {lr} | done |" in table
  assert files.exists(f"{workdir}/curves.png") and files.exists(f"{workdir}/results.csv")
  assert "step 10/10" in files.read_text(f"{workdir}/logs/learning_rate-0.001.log")
  first = f"{workdir}/{manifest['trials'][0]['name']}"
  assert "10" in files.listdir(f"{first}/checkpoints")
  assert files.glob(f"{first}/tensorboard", "events.out.tfevents.*")
  assert "test" in {r["split"] for r in metrics.read(first)}
  # Rerun: the TPU exists and every trial is done, so nothing is created or run.
  assert _sweep_here(spec, workdir, *tpu_args) == 0
  assert len(log.read_text().splitlines()) == 6

  # Five steps more from the bucket's checkpoint end where fifteen straight steps end.
  config = defaults.load_workdir_config(first)
  config.num_train_steps = 15
  resumed = trainer.train_and_evaluate(config, first)
  straight = trainer.train_and_evaluate(config, str(tmp_path / "straight"))
  assert resumed["final_train_loss"] == straight["final_train_loss"]
  sessions = json.loads(files.read_text(f"{first}/sessions.json"))
  assert [s["start_step"] for s in sessions] == [0, 10]
  timeless = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_per_s")}
                           for r in rows]
  assert timeless(metrics.read(first)) == timeless(metrics.read(str(tmp_path / "straight")))
  evaluated = restore.evaluate_workdir(first, "test", "best")
  assert evaluated["accuracy"] == resumed["test_accuracy"]
  assert files.exists(f"{first}/eval_test_best_{evaluated['step']}.json")

"""Sweeps: definition and checks, the local launcher end to end, resume after Ctrl-C,
failed trials, dry runs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from effx import sweep
from effx.launch import manifest as manifest_lib
from effx.launch import report as report_lib
from effx.launch import tpu
from effx.launch import trials as trials_lib
from effx.training import aot, defaults
from effx.training import loop as trainer
from conftest import CONFIGS

SWEEP_CONFIG = """
from effx import cli


def get_config(arg=None):
  c = cli.load_config("{configs}/lra_listops.py:tiny")
  c.update(dict(num_train_steps=10, eval_every_steps=5, checkpoint_every_steps=5,
                log_every_steps=5, max_eval_examples=16, warmup_steps=2,
                schedule="constant", learning_rate=0.003))
  c.model.update(dropout_rate=0.0, attention_dropout_rate=0.0)
  return c


def sweep(add, arg=None):
  for lr in (0.001, 0.003):
    add(learning_rate=lr)


def sweep_with_failure(add, arg=None):
  add(learning_rate=0.001)
  add(init_checkpoint="{missing}")  # valid config, fails when the run starts


def sweep_long(add, arg=None):
  add(**{{"num_train_steps": 150, "model.attention": "local"}})
  add(learning_rate=0.002)


def sweep_typo(add, arg=None):
  add(learning_rate=0.001)
  add(**{{"model.atention": "local"}})
"""


@pytest.fixture
def spec(tmp_path):
  path = tmp_path / "sweep_config.py"
  path.write_text(SWEEP_CONFIG.format(configs=CONFIGS, missing=tmp_path / "missing"))
  return str(path)


def _sweep(spec, workdir, *args):
  return [sys.executable, "-m", "effx.sweep", f"--config={spec}", f"--workdir={workdir}",
          *args]


def test_grid_helpers_names_and_commands(spec, tmp_path):
  assert trials_lib.product(a=[1, 2], b=["x"]) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
  assert trials_lib.zipped(a=[1, 2], b=[3, 4]) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
  with pytest.raises(ValueError, match="different lengths"):
    trials_lib.zipped(a=[1], b=[2, 3])
  assert trials_lib.trial_name({"model.attention": "local", "learning_rate": 0.01}) == \
      "attention-local_learning_rate-0.01"
  trials = trials_lib.define(spec, "long")
  cmd = trials_lib.command(spec, "/runs", trials[0])
  assert cmd[1:] == ["-m", "effx.train", f"--config={spec}",
                     "--workdir=/runs/num_train_steps-150_attention-local",
                     "--config.num_train_steps=150", "--config.model.attention=local"]
  with pytest.raises(ValueError, match="trial 'atention-local': --config.model.atention: "
                                       "unknown key"):
    trials_lib.define(spec, "typo")
  with pytest.raises(ValueError, match="defines no sweep_nope.*sweeps there: "
                                       r"\(default\), long, typo, with_failure"):
    trials_lib.define(spec, "nope")
  out = subprocess.run(_sweep(spec, tmp_path / "dry", "--dry-run"), capture_output=True,
                       text=True, check=True).stdout.splitlines()
  assert [line.split()[-1] for line in out] == ["--config.learning_rate=0.001",
                                                "--config.learning_rate=0.003"]
  assert not (tmp_path / "dry").exists()


def test_a_sweep_runs_in_parallel_records_a_failure_and_resumes_by_rerunning(spec, tmp_path):
  workdir = tmp_path / "sweep"
  done = subprocess.run(_sweep(spec, workdir, "--sweep=with_failure", "--parallel=2"),
                        capture_output=True, text=True)
  assert done.returncode == 1 and "failed: init_checkpoint" in done.stderr
  manifest = json.loads((workdir / "sweep.json").read_text())
  good, bad = manifest["trials"]
  assert good["status"] == "done" and bad["status"] == "failed"
  assert bad["attempts"] == 2 and "missing" in bad["error"]
  results = json.loads((workdir / good["name"] / "results.json").read_text())
  assert good["results"]["test_accuracy"] == results["test_accuracy"]
  table = (workdir / "results.md").read_text()
  assert f"| {good['name']} | 0.001 |  | done | {100 * results['test_accuracy']:.1f}%" in table
  assert f"| {bad['name']} |  | {tmp_path / 'missing'} | failed |  |" in table
  assert (workdir / "curves.png").stat().st_size > 0
  assert (workdir / "logs" / f"{bad['name']}.log").read_text().count("error:") == 2
  # Rerunning skips the finished trial (its workdir is untouched) and retries the failure.
  sessions = (workdir / good["name"] / "sessions.json").read_text()
  again = subprocess.run(_sweep(spec, workdir, "--sweep=with_failure"), capture_output=True,
                         text=True)
  assert again.returncode == 1
  assert (workdir / good["name"] / "sessions.json").read_text() == sessions
  assert json.loads((workdir / "sweep.json").read_text())["trials"][1]["attempts"] == 4
  # Another sweep in the same folder is refused.
  assert sweep.run([f"--config={spec}", f"--workdir={workdir}", "--sweep=long"]) == 1


def test_ctrl_c_stops_a_sweep_and_the_rerun_finishes_it_exactly(spec, tmp_path):
  workdir = tmp_path / "sweep"
  # pytest-xdist workers ignore SIGINT and children inherit that: give the sweep the
  # default handler a terminal would.
  process = subprocess.Popen(_sweep(spec, workdir, "--sweep=long"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  first = workdir / "num_train_steps-150_attention-local"
  deadline = time.time() + 240
  while not list((first / "checkpoints").glob("[0-9]*")):  # a checkpoint of trial 1 exists
    assert time.time() < deadline and process.poll() is None
    time.sleep(0.5)
  process.send_signal(signal.SIGINT)
  assert process.wait(timeout=120) == 130
  manifest = json.loads((workdir / "sweep.json").read_text())
  assert [t["status"] for t in manifest["trials"]] == ["interrupted", "pending"]
  subprocess.run(_sweep(spec, workdir, "--sweep=long"), check=True, capture_output=True)
  manifest = json.loads((workdir / "sweep.json").read_text())
  assert [t["status"] for t in manifest["trials"]] == ["done", "done"]
  sessions = json.loads((first / "sessions.json").read_text())
  assert len(sessions) == 2 and sessions[1]["start_step"] > 0
  # The interrupted trial ends exactly where an uninterrupted run ends.
  config = defaults.load_workdir_config(str(first))
  straight = trainer.train_and_evaluate(config, str(tmp_path / "straight"))
  resumed = json.loads((first / "results.json").read_text())
  assert resumed["final_train_loss"] == straight["final_train_loss"]
  assert resumed["test_accuracy"] == straight["test_accuracy"]
  assert os.path.exists(workdir / "results.csv")


def test_slurm_array_script_dry_run_submission_and_one_task(spec, tmp_path):
  workdir = tmp_path / "sweep"
  out = subprocess.run(_sweep(spec, workdir, "--launcher=slurm", "--parallel=2", "--nodes=2",
                              "--gpus_per_node=4", "--partition=gpu", "--dry-run"),
                       capture_output=True, text=True, check=True).stdout
  commands = [f"python -m effx.train --config={spec} --workdir={workdir}/learning_rate-{lr} "
              f"--distributed --config.learning_rate={lr}" for lr in ("0.001", "0.003")]
  assert out == "\n".join([
      f"# {workdir}/slurm/sweep.sbatch", "#!/bin/bash", "#SBATCH --job-name=effx-sweep",
      "#SBATCH --array=0-1%2", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
      "#SBATCH --gpus-per-node=4", "#SBATCH --time=24:00:00", "#SBATCH --partition=gpu",
      f"#SBATCH --output={workdir}/logs/slurm-%A_%a.log", "set -euo pipefail",
      f"cd {os.getcwd()}",
      "# Line SLURM_ARRAY_TASK_ID + 1 of the commands file is this task's trial.",
      f'line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {workdir}/slurm/commands.txt)',
      'srun bash -c "$line"', f"# {workdir}/slurm/commands.txt", *commands, ""])
  assert not workdir.exists()
  # Submission through a stand-in sbatch; then array task 1 runs through a stand-in srun
  # (one node: no --distributed) and the report finds its results.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "sbatch").write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/submitted"\n'
                                  'echo "Submitted batch job 42"\n')
  (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')
  for tool in ("sbatch", "srun"):
    (bin_dir / tool).chmod(0o755)
  python_dir = os.path.dirname(sys.executable)  # the job's `python` is this one
  env = {**os.environ, "PATH": f"{bin_dir}:{python_dir}:{os.environ['PATH']}"}
  submitted = subprocess.run(_sweep(spec, workdir, "--launcher=slurm", "--gpus_per_node=0"),
                             capture_output=True, text=True, check=True, env=env)
  assert "Submitted batch job 42" in submitted.stdout
  assert (bin_dir / "submitted").read_text().strip() == f"{workdir}/slurm/sweep.sbatch"
  lines = (workdir / "slurm" / "commands.txt").read_text().splitlines()
  assert len(lines) == 2 and "--distributed" not in lines[1]
  script = (workdir / "slurm" / "sweep.sbatch").read_text()
  subprocess.run(["bash", "-c", script], check=True, capture_output=True,
                 env={**env, "SLURM_ARRAY_TASK_ID": "1"})
  subprocess.run(_sweep(spec, workdir, "--report"), capture_output=True, check=True)
  statuses = [t["status"] for t in json.loads((workdir / "sweep.json").read_text())["trials"]]
  assert statuses == ["submitted", "done"]
  assert "| learning_rate-0.003 | 0.003 | done |" in (workdir / "results.md").read_text()
  refused = subprocess.run(_sweep(spec, workdir, "--launcher=slurm"), capture_output=True,
                           text=True, env=env)
  assert refused.returncode == 1 and "--resubmit submits the unfinished" in refused.stderr
  again = subprocess.run(_sweep(spec, workdir, "--launcher=slurm", "--resubmit"),
                         capture_output=True, text=True, check=True, env=env)
  assert "Submitted batch job 42" in again.stdout
  assert len((workdir / "slurm" / "commands.txt").read_text().splitlines()) == 1


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


def test_tpu_launch_dry_run_and_its_bad_input(spec, tmp_path):

  bucket = "gs://bucket/sweep"
  args = ["--launcher=tpu", "--tpu=effx-pod", "--zone=us-west4-a",
          "--accelerator=v5litepod-16"]
  out = subprocess.run(_sweep(spec, bucket, *args, "--queued", "--project=lab", "--dry-run"),
                       capture_output=True, text=True, check=True, cwd=tmp_path).stdout
  zone = "--zone=us-west4-a --project=lab"
  archive = f"{manifest_lib.stage(bucket)}/effx.tar.gz"
  gcloud = "gcloud compute tpus"
  trials = [f"{gcloud} tpu-vm ssh effx-pod --worker=all --command 'cd effx && python3 -m "
            f"effx.train --config=sweep_config.py --workdir={bucket}/learning_rate-{lr} "
            f"--distributed --config.learning_rate={lr}' {zone}" for lr in ("0.001", "0.003")]
  assert out.splitlines() == [
      f"# unless `{gcloud} tpu-vm describe effx-pod {zone}` finds it:",
      f"{gcloud} queued-resources create effx-pod --node-id=effx-pod "
      f"--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite {zone}",
      f"# then wait until `{gcloud} queued-resources describe effx-pod "
      f"'--format=value(state.state)' {zone}` prints ACTIVE",
      f"tar czf {archive} --exclude=__pycache__ -C {tpu.ROOT} pyproject.toml README.md effx "
      f"configs -C {tmp_path} sweep_config.py",
      f"{gcloud} tpu-vm scp {archive} effx-pod:effx.tar.gz --worker=all {zone}",
      f"{gcloud} tpu-vm ssh effx-pod --worker=all --command 'rm -rf effx && mkdir effx && "
      f"tar xzf effx.tar.gz -C effx && cd effx && python3 -m pip install -q -e .[tpu]' {zone}",
      *trials]
  direct = subprocess.run(_sweep(spec, bucket, *args, "--spot", "--dry-run"),
                          capture_output=True, text=True, check=True).stdout.splitlines()
  assert direct[1] == ("gcloud compute tpus tpu-vm create effx-pod --accelerator-type="
                       "v5litepod-16 --version=v2-alpha-tpuv5-lite --spot --zone=us-west4-a")
  for bad, message in [
      ((bucket, "--launcher=tpu", "--zone=z", "--accelerator=v4-8"), "needs --tpu=NAME"),
      ((bucket, *args[:3], "--accelerator=v5e16"), "not a TPU type gcloud takes"),
      ((bucket, *args[:3], "--accelerator=v9-8"), "no default runtime image for v9"),
      ((str(tmp_path / "local"), *args), "needs --workdir=gs://BUCKET"),
      ((bucket, *args, "--parallel=2"), "one trial at a time")]:
    result = subprocess.run(_sweep(spec, *bad), capture_output=True, text=True)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def _stand_in_hosts(count):
  """The environment of ``count`` processes that ``jax.distributed.initialize()`` (no
  arguments) joins as one cluster: Slurm's variables stand in for a TPU's metadata."""
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
          "SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "127.0.0.1",
          "SLURM_NTASKS": str(count), "SLURM_LOCALID": "0"}


@pytest.mark.slow
def test_a_tpu_trial_runs_on_two_stand_in_hosts(spec, tmp_path):
  """The tpu launcher's own archive, unpacked as each worker unpacks it, and its worker
  command run by two local processes: ``--distributed`` makes both call
  ``jax.distributed.initialize()`` with no arguments, which finds the other from the
  cluster's environment (Slurm's variables stand in for the TPU metadata here)."""

  trial = trials_lib.define(spec, None)[0]
  home = tmp_path / "home"
  (home / "effx").mkdir(parents=True)
  archive = str(tmp_path / "effx.tar.gz")
  subprocess.run(tpu.pack([spec], archive), check=True)
  subprocess.run(["tar", "xzf", archive, "-C", str(home / "effx")], check=True)
  workdir = tmp_path / "run"
  remote = tpu.worker_command(trials_lib.command(spec, str(workdir), trial, python="python3",
                                            distributed=True))
  assert remote.startswith("cd effx && python3 -m effx.train --config=sweep_config.py ")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
  (bin_dir / "python3").chmod(0o755)
  env = {**_stand_in_hosts(2), "PATH": f"{bin_dir}:{os.environ['PATH']}",
         "JAX_NUM_CPU_DEVICES": "1", "PYTHONPATH": ""}
  hosts = [subprocess.Popen(["bash", "-c", remote], cwd=home, text=True,
                            env={**env, "SLURM_PROCID": str(i)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT) for i in range(2)]
  outs = [host.communicate(timeout=400)[0] for host in hosts]
  assert all(host.returncode == 0 for host in hosts), outs[0][-2000:] + outs[1][-2000:]
  results = json.loads((workdir / trial.name / "results.json").read_text())
  assert results["step"] == 10 and results["devices"].startswith("2 x")
  assert results["config"]["learning_rate"] == 0.001


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
def test_a_sweep_and_its_runs_live_in_a_bucket(spec, bucket, tmp_path):
  """gs:// workdirs (a Cloud Storage emulator here): checkpoints through orbax, every
  other file through effx.common.files; the runs resume from the bucket exactly."""
  from effx.common import files
  from effx.training import metrics

  workdir = f"{bucket}/sweep"
  assert sweep.run([f"--config={spec}", f"--workdir={workdir}"]) == 0
  manifest = json.loads(files.read_text(f"{workdir}/sweep.json"))
  assert [t["status"] for t in manifest["trials"]] == ["done", "done"]
  first = f"{workdir}/{manifest['trials'][0]['name']}"
  assert "| learning_rate-0.001 | 0.001 | done |" in files.read_text(f"{workdir}/results.md")
  assert files.exists(f"{workdir}/curves.png") and files.exists(f"{workdir}/results.csv")
  assert "step 10/10" in files.read_text(f"{workdir}/logs/learning_rate-0.001.log")
  assert "10" in files.listdir(f"{first}/checkpoints")
  assert files.glob(f"{first}/tensorboard", "events.out.tfevents.*")
  assert "test" in {r["split"] for r in metrics.read(first)}
  # Five steps more from the bucket's checkpoint end where fifteen straight steps end.
  config = defaults.load_workdir_config(first)
  config.num_train_steps = 15
  resumed = trainer.train_and_evaluate(config, first)
  straight = trainer.train_and_evaluate(config, str(tmp_path / "straight"))
  assert resumed["final_train_loss"] == straight["final_train_loss"]
  sessions = json.loads(files.read_text(f"{first}/sessions.json"))
  assert [s["start_step"] for s in sessions] == [0, 10]
  timeless = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_per_s")}  # noqa: E731
                           for r in rows]
  assert timeless(metrics.read(first)) == timeless(metrics.read(str(tmp_path / "straight")))
  from effx.training import restore

  evaluated = restore.evaluate_workdir(first, "test", "best")
  assert evaluated["accuracy"] == resumed["test_accuracy"]
  assert files.exists(f"{first}/eval_test_best_{evaluated['step']}.json")


@pytest.mark.slow
def test_the_tpu_launcher_creates_installs_runs_and_reports(spec, bucket, tmp_path):
  """``--launcher=tpu`` against a stand-in ``gcloud`` whose one-worker "TPU" is a local
  folder: the TPU is created because ``describe`` fails, the packed checkout is copied
  and unpacked there, each trial runs in it with ``--distributed``, and the results in
  the bucket make the report."""
  from effx.common import files

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
  env = {**_stand_in_hosts(1), "PATH": f"{bin_dir}:{os.environ['PATH']}",
         "SLURM_PROCID": "0"}
  workdir = f"{bucket}/tpu_sweep"
  subprocess.run(_sweep(spec, workdir, "--launcher=tpu", "--tpu=pod", "--zone=z",
                        "--accelerator=v4-8"), check=True, env=env, capture_output=True)
  verbs = [line.split()[3] for line in log.read_text().splitlines()]
  assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh"]
  manifest = json.loads(files.read_text(f"{workdir}/sweep.json"))
  assert [t["status"] for t in manifest["trials"]] == ["done", "done"]
  assert (home / "effx" / "effx" / "tpu.py").exists()
  assert "| learning_rate-0.003 | 0.003 | done |" in files.read_text(f"{workdir}/results.md")
  # Rerun: the TPU exists and every trial is done, so nothing is created or run.
  subprocess.run(_sweep(spec, workdir, "--launcher=tpu", "--tpu=pod", "--zone=z",
                        "--accelerator=v4-8"), check=True, env=env, capture_output=True)
  assert len(log.read_text().splitlines()) == 6

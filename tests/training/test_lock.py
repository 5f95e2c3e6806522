"""One process per workdir (``effx.common.lock``): a second trainer, evaluation or sweep
on a workdir in use stops at once, names the holder and touches nothing; a lock left by a
killed process is no lock."""

import hashlib
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from effx import sweep
from effx.common import lock
from effx.training import loop
from conftest import listops_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
HOLD = ("import sys, time\nfrom effx.common import lock\n"
        "with lock.workdir_lock(sys.argv[1], 'a test holder'):\n"
        "  print('held', flush=True)\n  time.sleep(120)\n")


@pytest.fixture
def held(tmp_path):
  """``hold(workdir)``: a separate process holding ``workdir``'s lock until the test ends
  (returns the process)."""
  processes = []

  def hold(workdir):
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    processes.append(process)
    return process

  yield hold
  for process in processes:
    process.kill()
    process.wait()


def _tree(folder):
  """Every file under ``folder`` with its bytes' digest and modification time."""
  return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                       p.stat().st_mtime_ns)
          for p in sorted(pathlib.Path(folder).rglob("*")) if p.is_file()}


def test_a_second_trainer_or_evaluation_is_refused_and_touches_nothing(listops_copy, held):
  holder = held(listops_copy)
  before = _tree(listops_copy)
  message = (rf"workdir {listops_copy} is in use by pid {holder.pid} on "
             rf"{socket.gethostname()} since .* \(a test holder .*\).*another --workdir")
  with pytest.raises(lock.WorkdirInUseError, match=message):
    loop.train_and_evaluate(listops_config(num_train_steps=40), str(listops_copy))
  out = subprocess.run([sys.executable, "-m", "effx.evaluate", f"--workdir={listops_copy}"],
                       cwd=ROOT, capture_output=True, text=True)
  assert out.returncode != 0 and "is in use by pid" in out.stderr, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  assert _tree(listops_copy) == before


def test_a_killed_holder_leaves_no_lock(tmp_path, held):
  workdir = tmp_path / "run"
  holder = held(workdir)
  with pytest.raises(lock.WorkdirInUseError):
    with lock.workdir_lock(str(workdir), "second"):
      pass
  # A trainer refused on a folder that holds nothing but the lock leaves it as it is.
  with pytest.raises(lock.WorkdirInUseError):
    loop.train_and_evaluate(listops_config(), str(workdir))
  assert lock.holder(str(workdir))["pid"] == holder.pid
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with lock.workdir_lock(str(workdir), "third"):  # taken over at once
    assert lock.holder(str(workdir))["pid"] == os.getpid()
  # A refused start on a new workdir leaves no folder behind either.
  fresh = tmp_path / "fresh"
  with pytest.raises(ValueError):
    loop.train_and_evaluate(listops_config(num_train_steps=-1), str(fresh))
  assert not fresh.exists()


def test_a_second_sweep_on_one_folder_is_refused(tmp_path, held, capsys):
  held(tmp_path / "sweep")
  code = sweep.run([f"--config={ROOT / 'configs' / 'lra_listops.py'}:tiny", "--sweep=lr",
                    f"--workdir={tmp_path / 'sweep'}"])
  assert code != 0
  assert "is in use by pid" in capsys.readouterr().err
  assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == [".lock"]

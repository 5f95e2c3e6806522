"""The benchmark harnesses run end to end on tiny sizes and report sane figures."""

import csv

import pytest

from effx.bench import attention, harness, lra_efficiency, tpu_aot


@pytest.mark.slow  # four fresh benchmark subprocesses (each imports JAX and compiles)
def test_attention_benchmark_end_to_end(tmp_path):
  rows = attention.run(["dense", "local"], [256, 512], mode="train", repeat=1,
                       out=str(tmp_path), progress=False, timeout_s=300)
  with open(tmp_path / "results.csv", newline="") as f:
    table = list(csv.DictReader(f))
  assert [(r["family"], int(r["length"])) for r in table] == [
      ("dense", 256), ("dense", 512), ("local", 256), ("local", 512)]
  assert set(table[0]) == set(attention.COLUMNS)
  assert all(r["status"] == "ok" and float(r["time_median_s"]) > 0 for r in table)
  for name in ("time.png", "memory.png", "peak.png", "README.md"):
    assert (tmp_path / name).stat().st_size > 0
  temp = {(r["family"], r["length"]): r["temp_bytes"] for r in rows}
  assert 3.3 < temp[("dense", 512)] / temp[("dense", 256)] < 4.6     # quadratic
  assert 1.6 < temp[("local", 512)] / temp[("local", 256)] < 2.4     # linear
  readme = (tmp_path / "README.md").read_text()
  assert "python -m" in readme and "Device:" in readme
  assert {r["ran_on"] for r in table} == {"xla"}
  # Another backend: the worker records what ran; a family without it is named, not run.
  spec = dict(family="local", backend="pallas", length=128, mode="train", batch=1, heads=2,
              head_dim=16, dtype="float32", causal=False, options={"window": 16}, repeat=1)
  assert attention.worker(spec)["ran_on"] == "pallas"
  assert attention.run(["performer"], [256], backends=("pallas",), out=str(tmp_path / "pallas"),
                       progress=False) == []
  assert "No such backend: performer on pallas." in (tmp_path / "pallas" / "README.md").read_text()


@pytest.mark.slow  # the worker as the benchmark runs it (compiles a 4-layer train step)
def test_lra_efficiency_step_measures_one_family(monkeypatch):
  # The worker's code path at a tiny width: the Text model's 4 layers x 256 wide only cost
  # compile and initialisation time here.
  monkeypatch.setattr(lra_efficiency, "TEXT_MODEL", dict(
      lra_efficiency.TEXT_MODEL, num_layers=1, emb_dim=16, qkv_dim=16, num_heads=2,
      mlp_dim=32))
  result = lra_efficiency.worker(dict(family="local", length=64, batch=2, dtype="float32",
                                      repeat=1, options={"window": 16}))
  assert result["status"] == "ok" and result["steps_per_s"] > 0 and result["temp_bytes"] > 0


def test_crossover_is_the_shortest_faster_length():
  rows = [dict(series=f, length=n, status="ok", time_median_s=t) for f, n, t in [
      ("dense", 1, 1.0), ("dense", 2, 4.0), ("dense", 4, 16.0),
      ("local", 1, 2.0), ("local", 2, 3.0), ("local", 4, 6.0)]]
  rows.append(dict(series="dense", length=8, status="oom"))
  rows.append(dict(series="local", length=8, status="ok", time_median_s=12.0))
  assert attention.crossovers(rows, "dense") == {"dense": None, "local": 2}


def test_bad_input():
  with pytest.raises(ValueError, match="unknown family 'flash'.*registered: .*dense"):
    attention.check_families("dense,flash")
  with pytest.raises(ValueError, match="--backends: unknown backend 'triton'; known: cudnn, "
                                       "pallas, splash, xla"):
    attention.check_backends("xla,triton")
  with pytest.raises(ValueError, match="--lengths: 0 is not a positive length"):
    harness.parse_lengths("512,0")
  with pytest.raises(ValueError, match="'1k' is not an integer"):
    harness.parse_lengths("1k")
  with pytest.raises(ValueError, match="--mode='fast'"):
    attention.run(["dense"], [64], mode="fast", progress=False)


def test_tpu_aot_rows_report_and_resume(tmp_path, monkeypatch):
  """The TPU ahead-of-time table: every kernel family on xla and splash (auto where it
  has no splash), local at 16K in two models; the report from rows; a rerun compiles only
  the rows it lacks (the compiles themselves need libtpu: tests/training/test_sweep.py
  compiles splash for a topology where it is installed)."""
  rows = tpu_aot.trials(["local", "bigbird"])
  assert [(r["model"], r["family"], r["asked"]) for r in rows] == [
      ("text_4k", "local", "xla"), ("text_4k", "local", "splash"),
      ("text_4k", "bigbird", "xla"), ("text_4k", "bigbird", "auto"),
      ("local_16k", "local", "xla"), ("local_16k", "local", "splash"),
      ("text_16k_d128", "local", "xla"), ("text_16k_d128", "local", "splash")]
  top = {"topology": "v5e:2x2"}
  done = [{**top, **rows[0], "status": "ok", "attention_backend": "xla",
           "per_device_gib": 4.9, "temp_gib": 4.0, "flops": 2e11, "bytes_accessed": 1e10,
           "compile_s": 60},
          {**top, **rows[1], "status": "ok", "attention_backend": "splash",
           "per_device_gib": 5.9, "temp_gib": 5.0, "flops": 1e11, "bytes_accessed": 2e10,
           "compile_s": 50},
          {**top, **rows[2], "status": "does not fit", "detail": "HBM"}]
  tpu_aot.write(done, "v5e:2x2", str(tmp_path))
  with open(tmp_path / "results.csv", newline="") as f:
    assert [r["status"] for r in csv.DictReader(f)] == ["ok", "ok", "does not fit"]
  readme = (tmp_path / "README.md").read_text()
  assert "| text_4k | local | splash | splash | ok | 5.9 | 5.0 | 100 | 20.0 | 50 |" in readme
  assert "does not fit: HBM" in readme and (tmp_path / "memory.png").stat().st_size > 0
  asked = []

  def stand_in(module, spec, timeout_s):  # what libtpu would compile, recorded
    asked.append((spec["model"], spec["family"], spec["asked"]))
    if spec["model"] == "local_16k":
      return {"status": "error", "detail": "no libtpu here"}
    return {"status": "ok", "attention_backend": spec["asked"], "per_device_gib": 2.5}

  monkeypatch.setattr(harness, "run_isolated", stand_in)
  again = tpu_aot.run(["local"], "v5e:2x2", str(tmp_path))  # rows read back as text
  assert asked == [("local_16k", "local", "xla"), ("local_16k", "local", "splash"),
                   ("text_16k_d128", "local", "xla"), ("text_16k_d128", "local", "splash")]
  assert [r["status"] for r in again] == ["ok", "ok", "error", "error", "ok", "ok"]

"""ONNX export (``effx.export --format=onnx``): every attention family's classifier, a
sentence encoder and a causal LM converted and run in ONNX Runtime, equal to effx's
forward; a symbolic batch where jax2onnx can express it; int8 (dynamic and static) within
a stated tolerance; a finished workdir end to end with its manifest and the students
report over its artifacts; refusals that write nothing."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import listops_config  # noqa: F401 (the listops_run fixture's config)
from support import model_options

pytest.importorskip("jax2onnx", reason="ONNX export needs jax2onnx (requirements-models.txt)")
ort = pytest.importorskip("onnxruntime")

import effx.attention as ea  # noqa: E402
from effx import models  # noqa: E402
from effx.bench import students  # noqa: E402
from effx.training import deploy, deploy_onnx  # noqa: E402

BASE = dict(vocab_size=20, max_len=40, num_classes=3, num_layers=1, emb_dim=16,
            num_heads=2, qkv_dim=16, mlp_dim=32, dropout_rate=0.0)
# A symbolic batch converts for these; the others' graphs hold operations whose
# jax2onnx lowering needs static shapes (rem, pad): one artifact per batch size, and a
# dynamic batch refused with a message.
ONNX_DYNAMIC_BATCH = {"dense", "linformer", "performer", "linear", "cosformer",
                      "synthesizer"}
# Float ONNX against effx's forward, relative to the largest output.
TOLERANCE = 1e-4


def _ids(batch, length, seed):
  ids = np.random.RandomState(seed).randint(1, 20, size=(batch, length)).astype(np.int32)
  ids[0, length // 2:] = 0  # a padded row
  return ids


def _relative(got, expected):
  return float(np.max(np.abs(got - expected)) / (np.max(np.abs(expected)) + 1e-6))


def _session(proto, tmp_path, name):
  path = tmp_path / f"{name}.onnx"
  path.write_bytes(proto.SerializeToString())
  return deploy_onnx.session(str(path))


def _check(name, config, tmp_path, dynamic):
  model = models.build(config)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((2, 40), jnp.int32))
  ids = _ids(3, 40, 1)
  expected = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False)[0])(
      variables, ids))
  proto = deploy.export_onnx(model, variables, max_len=40, batch="dynamic" if dynamic else 3,
                             family=name)
  session = _session(proto, tmp_path, name)
  worst = _relative(session.run(None, {"inputs": ids})[0], expected)
  if dynamic:  # one artifact, another batch size: row 0 alone
    worst = max(worst, _relative(session.run(None, {"inputs": ids[:1]})[0], expected[:1]))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
  else:
    with pytest.raises(ValueError, match=f"{name} cannot export a dynamic batch to ONNX: "
                                         ".*; give --batch=N"):
      deploy.export_onnx(model, variables, max_len=40, family=name)
  assert worst < TOLERANCE, (name, worst)


@pytest.mark.slow  # a conversion per family (jax2onnx traces in Python: 2-10 s each)
@pytest.mark.parametrize("name", ea.names())
def test_every_family_runs_in_onnx_runtime(name, tmp_path):
  options = model_options(name)
  _check(name, dict(BASE, attention=name, attention_kwargs=options), tmp_path,
         name in ONNX_DYNAMIC_BATCH)


@pytest.mark.parametrize("kind", ["encoder", "causal_lm"])
def test_an_encoder_and_a_causal_lm_run_in_onnx_runtime(kind, tmp_path):
  config = dict(BASE, kind=kind, attention="dense")
  if kind == "encoder":
    config.update(pool="mean", normalize=True)
  else:
    config.update(norm="pre")
  _check(kind, config, tmp_path, dynamic=True)


def test_the_rewrites_keep_the_math_and_make_matmuls(tmp_path):
  """The replay ONNX is made from computes what the traced program does, and its products
  are MatMuls with each layer's weights as their own initializers (what ORT quantizes)."""
  model = models.build(dict(BASE, num_layers=2, attention="local",
                            attention_kwargs={"window": 8}))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((2, 40), jnp.int32))
  forward = lambda x: model.apply(variables, x, train=False)[0]  # noqa: E731
  ids = _ids(3, 40, 2)
  replay = deploy_onnx.prepare(forward, [jax.ShapeDtypeStruct((3, 40), jnp.int32)])
  np.testing.assert_allclose(np.asarray(jax.jit(replay)(ids)), np.asarray(forward(ids)),
                             rtol=1e-6, atol=1e-6)
  proto = deploy.export_onnx(model, variables, max_len=40, batch=3, family="local")
  ops = [n.op_type for n in proto.graph.node]
  initializers = {i.name for i in proto.graph.initializer}
  weights = [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in
             initializers]
  # 2 layers x (q, k, v, out, 2 MLP) + the head's 2; no Loop over stacked layers.
  assert len(weights) == 14 and "Loop" not in ops and "Einsum" not in ops, ops
  # Booleans never reach a Where (ORT has no boolean Where kernel).
  types = {i.name: i.data_type for i in proto.graph.initializer}
  assert all(types.get(n.input[1]) != 9 for n in proto.graph.node if n.op_type == "Where")


@pytest.mark.slow  # the command, three int8 conversions, and the report's 4 processes
def test_a_workdir_exports_to_onnx_in_float_and_int8_and_is_reported(listops_run, tmp_path):
  out = tmp_path / "onnx"
  done = subprocess.run([sys.executable, "-m", "effx.export", f"--workdir={listops_run}",
                         f"--out={out}", "--format=onnx"], capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "model.onnx: classifier (dense), step" in done.stdout
  assert "equals effx's forward to" in done.stdout
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["format"] == "onnx" and manifest["int8"] == "none"
  assert manifest["inputs"][0]["shape"][0] == "batch"
  assert manifest["check"]["float_max_relative_error"] < TOLERANCE
  run = str(listops_run)
  dynamic = deploy.export_workdir(run, str(tmp_path / "dynamic"), format="onnx",
                                  int8="dynamic")
  static = deploy.export_workdir(run, str(tmp_path / "static"), format="onnx", int8="static",
                                 calibration_examples=64, batch=8)
  assert static["calibration_examples"] == 64 and static["inputs"][0]["shape"][0] == "8"
  size = (out / "model.onnx").stat().st_size
  for manifest, folder in ((dynamic, "dynamic"), (static, "static")):
    # int8 stays near float: the worst logit within 30% of their scale on random ids (a
    # model of width 16; the test split's accuracy is the real check, below).
    assert manifest["check"]["int8_max_relative_error"] < 0.3, manifest["check"]
    assert (tmp_path / folder / "model.onnx").stat().st_size < 0.8 * size
  deploy.export_workdir(run, str(tmp_path / "hlo"))
  rows = students.run([run, str(tmp_path / "hlo"), str(out), str(tmp_path / "dynamic"),
                       str(tmp_path / "static")], ["effx", "hlo", "fp32", "dyn", "static"],
                      teacher=0, batches=[1, 8], calls=2, warmup=1, timeout_s=300,
                      out=str(tmp_path / "report"), artifacts=(False, True, True, True, True),
                      threads=(1,))
  assert [r["status"] for r in rows] == ["ok"] * 5, rows
  assert [r["route"] for r in rows] == ["effx", "StableHLO", "ORT fp32", "ORT int8 dynamic",
                                        "ORT int8 static"]
  # Float routes classify the whole test split exactly as effx does; int8 within 5 points.
  assert rows[1]["test_accuracy"] == rows[2]["test_accuracy"] == rows[0]["test_accuracy"]
  assert all(abs(r["accuracy_delta"]) <= 0.05 for r in rows[3:]), rows
  assert "latency_b1_ms" not in rows[4] and rows[4]["latency_b8_ms"] > 0  # batch 8 only
  assert all(r["disk_bytes"] > 0 and r["threads"] == 1 for r in rows)
  for name in ("students.csv", "students.md", "students.png"):
    assert (tmp_path / "report" / name).stat().st_size > 0


def test_onnx_refusals_write_nothing(listops_run, tmp_path):
  run = str(listops_run)
  cases = [
      (dict(format="stablehlo", int8="dynamic"), "--int8=dynamic needs --format=onnx"),
      (dict(format="onnx", int8="int4"), "--int8='int4': one of none, dynamic, static"),
      (dict(format="onnx", int8="static", calibration_examples=0),
       "--calibration_examples=0: static int8 needs at least one example"),
      (dict(format="onnx", platforms=("cuda",)), "an ONNX artifact is made for ONNX "
                                                 "Runtime's CPU provider"),
  ]
  before = sorted(p.name for p in tmp_path.iterdir())
  for kwargs, message in cases:
    with pytest.raises(ValueError) as error:
      deploy.export_workdir(run, str(tmp_path / "out"), **kwargs)
    assert message in str(error.value), (kwargs, error.value)
  assert sorted(p.name for p in tmp_path.iterdir()) == before

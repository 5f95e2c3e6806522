"""StableHLO export (``effx.export``): every attention family's classifier, a sentence
encoder and a causal LM exported and called in a fresh process that imports neither
effx nor flax, equal to effx's forward; a finished workdir end to end with its manifest;
refusals that write nothing."""

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import listops_config  # noqa: F401 (the listops_run fixture's config)
from support import model_options

import effx.attention as ea
from effx import models
from effx.training import deploy

BASE = dict(vocab_size=20, max_len=40, num_classes=3, num_layers=1, emb_dim=16,
            num_heads=2, qkv_dim=16, mlp_dim=32, dropout_rate=0.0)

FRESH = """
import json, sys
import numpy as np
from jax import export
cases = json.load(open(sys.argv[1]))
worst = 0.0
for case in cases:
  exported = export.deserialize(open(case["file"], "rb").read())
  for ids, expected in zip(case["inputs"], case["expected"]):
    got = np.asarray(exported.call(np.asarray(ids, np.int32)))
    expected = np.asarray(expected, np.float32)
    assert got.shape == expected.shape, (case["name"], got.shape, expected.shape)
    worst = max(worst, float(np.max(np.abs(got - expected)) / (np.max(np.abs(expected)) + 1e-6)))
assert "effx" not in sys.modules and "flax" not in sys.modules
print(json.dumps({"worst": worst, "count": len(cases)}))
"""


def _ids(batch, length, seed):
  ids = np.random.RandomState(seed).randint(1, 20, size=(batch, length)).astype(np.int32)
  ids[0, length // 2:] = 0  # a padded row
  return ids


def _forward(model):
  return jax.jit(lambda variables, ids: model.apply(variables, ids, train=False)[0])


@functools.lru_cache(maxsize=None)
def _dense_variables():
  model = models.build(dict(BASE, attention="dense"))
  return jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((2, 40), jnp.int32))


def _family_case(name, tmp_path):
  options = model_options(name)
  model = models.build(dict(BASE, attention=name, attention_kwargs=options))
  dense = _dense_variables()
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 40), jnp.int32))
  # Families without variables of their own share dense's (an init compile saved).
  same = jax.tree.structure(shapes) == jax.tree.structure(dense)
  variables = dense if same else jax.jit(model.init)(jax.random.PRNGKey(0),
                                                     jnp.zeros((2, 40), jnp.int32))
  # Every family exports a dynamic batch. Two batch sizes through one artifact once
  # (dense); one call per other family (tests/attention/test_symbolic_batch.py calls
  # every family's attention at two).
  batches = (1, 3) if name == "dense" else (3,)
  exported = deploy.export_model(model, variables, max_len=40, family=name)
  inputs = [_ids(b, 40, seed) for seed, b in enumerate(batches)]
  expected = [np.asarray(_forward(model)(variables, ids)) for ids in inputs]
  path = tmp_path / f"{name}.stablehlo"
  path.write_bytes(exported.serialize())
  return {"name": name, "file": str(path), "inputs": [i.tolist() for i in inputs],
          "expected": [e.tolist() for e in expected]}


def _kind_case(kind, tmp_path):
  config = dict(BASE, kind=kind, attention="dense")
  if kind == "encoder":
    config.update(pool="mean", normalize=True)
  if kind == "causal_lm":
    config.update(attention="local", attention_kwargs={"window": 8}, norm="pre")
  model = models.build(config)
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((2, 40), jnp.int32))
  exported = deploy.export_model(model, variables, max_len=40, batch=2, family=kind)
  ids = _ids(2, 40, 7)
  path = tmp_path / f"{kind}.stablehlo"
  path.write_bytes(exported.serialize())
  return {"name": kind, "file": str(path), "inputs": [ids.tolist()],
          "expected": [np.asarray(_forward(model)(variables, ids)).tolist()]}


@pytest.mark.slow  # one compile per family here and one in the fresh process
def test_every_family_and_kind_runs_in_a_fresh_process_without_effx(tmp_path):
  cases = [_family_case(name, tmp_path) for name in ea.names()]
  cases += [_kind_case(kind, tmp_path) for kind in ("encoder", "causal_lm")]
  (tmp_path / "cases.json").write_text(json.dumps(cases))
  out = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "cases.json")],
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["count"] == len(ea.names()) + 2
  assert result["worst"] < 1e-5, result


def test_a_dynamic_length_where_the_family_allows_it():
  model = models.build(dict(BASE, attention="dense"))
  variables = _dense_variables()
  exported = deploy.export_model(model, variables, max_len=40, length="dynamic")
  ids = _ids(2, 24, 3)
  np.testing.assert_allclose(np.asarray(exported.call(ids)),
                             np.asarray(_forward(model)(variables, ids)), rtol=1e-5, atol=1e-6)
  local = models.build(dict(BASE, attention="local", attention_kwargs={"window": 8}))
  with pytest.raises(ValueError, match="local cannot export a dynamic length to StableHLO: .*give "
                                       "--length=N"):
    deploy.export_model(local, variables, max_len=40, batch=2, length="dynamic",
                        family="local")


def test_a_workdir_exports_with_its_manifest_and_refusals_write_nothing(listops_run, tmp_path):
  """The command once (a subprocess: its flags would clash with other commands' in this
  process), then the library's refusals and --overwrite."""
  out = tmp_path / "artifact"
  done = subprocess.run([sys.executable, "-m", "effx.export", f"--workdir={listops_run}",
                         f"--out={out}"], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "model.stablehlo: classifier (dense), step" in done.stdout
  manifest = json.loads((out / "manifest.json").read_text())
  results = json.loads((listops_run / "results.json").read_text())
  assert manifest["step"] == results["best_step"] and manifest["checkpoint"] == "best"
  length = manifest["inputs"][0]["shape"][1]
  assert manifest["inputs"] == [{"name": "inputs", "dtype": "int32", "shape": ["b", length],
                                 "padding_id": 0}]
  assert manifest["outputs"][0]["shape"] == ["b", "10"]
  assert manifest["attention"] == "dense" and manifest["platforms"] == ["cpu"]
  exported = jax.export.deserialize((out / "model.stablehlo").read_bytes())
  assert exported.in_avals[0].dtype == jnp.int32

  run = str(listops_run)
  cases = [
      (dict(workdir=str(tmp_path), out=str(tmp_path / "a")), "not an effx.train workdir"),
      (dict(workdir=run, out=str(out)), "exists; choose another folder or pass --overwrite"),
      (dict(workdir=run, out=str(tmp_path / "b"), checkpoint="last"),
       "--checkpoint='last': use 'latest', 'best' or a step number"),
      (dict(workdir=run, out=str(tmp_path / "c"), batch="0"),
       "--batch='0': a positive integer or 'dynamic'"),
      (dict(workdir=run, out=str(tmp_path / "d"), length=100000),
       "--length=100000 exceeds the model's length"),
      (dict(workdir=run, out=str(tmp_path / "e"), format="tflite"),
       "--format='tflite': one of stablehlo, onnx"),
  ]
  before = sorted(p.name for p in tmp_path.iterdir())
  for kwargs, message in cases:
    with pytest.raises((ValueError, OSError)) as error:
      deploy.export_workdir(**kwargs)
    assert message in str(error.value), (kwargs, error.value)
  assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
  # --overwrite replaces the artifact once the new one is whole.
  deploy.export_workdir(run, str(out), overwrite=True, batch=4, checkpoint="latest")
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["inputs"][0]["shape"][0] == "4" and manifest["checkpoint"] == "latest"
  assert sorted(p.name for p in tmp_path.iterdir()) == before

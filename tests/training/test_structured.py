"""Head and feed-forward-unit pruning: importance as the gate gradient, the export equals
the masked model, and the exported workdir evaluates."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effx import models
from effx.compress import structured
from effx.training import exports
from effx.training.restore import evaluate_workdir


def _model(**overrides):
  config = dict(kind="classifier", vocab_size=16, max_len=24, num_classes=10, num_layers=2,
                emb_dim=16, num_heads=4, qkv_dim=16, mlp_dim=32, dropout_rate=0.0,
                attention_dropout_rate=0.0, pool="cls")
  config.update(overrides)
  return models.build(models.model_config(config))


def _inputs():
  tokens = np.random.default_rng(0).integers(1, 16, size=(3, 24)).astype(np.int32)
  tokens[2, 10:] = 0
  return jnp.asarray(tokens)


def _init(model):
  # Jitted here and below: one compilation instead of one per operation.
  return nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), _inputs())["params"])


def _logits(model, params):
  return jax.jit(model.apply)({"params": params}, _inputs())[0]


@pytest.mark.slow  # compiles gradients of a gated model
def test_importance_is_the_gradient_of_a_head_gate():
  """Against a gate put into the computation by hand: head h's output scaled by ξ_h."""
  model = _model()
  params = _init(model)
  batch = {"inputs": _inputs(), "targets": jnp.asarray([1, 2, 3])}

  def loss(p, b):
    logits = model.apply({"params": p}, b["inputs"])[0]
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), b["targets"]])

  heads, units = structured.importance(loss, params, [batch])

  def gated(xi):  # xi [layers, heads]: scales each head's rows of the output projection
    out = structured._get(params, structured.ATTENTION)["out"]
    kernel = out["kernel"] * xi[:, :, None, None]
    return loss(structured._with(params, structured.ATTENTION + ("out",),
                                 {**out, "kernel": kernel}), batch)

  expected = np.abs(np.asarray(jax.jit(jax.grad(gated))(jnp.ones((2, 4)))))
  np.testing.assert_allclose(heads, expected, rtol=1e-5, atol=1e-8)
  assert units.shape == (2, 32) and (units >= 0).all()


def test_keep_top_and_the_export_equals_the_masked_model():
  scores = np.array([[0.1, 0.9, 0.5, 0.2], [0.7, 0.1, 0.2, 0.8]])
  np.testing.assert_array_equal(structured.keep_top(scores, 2), [[1, 2], [0, 3]])
  with pytest.raises(ValueError, match="cannot keep 5 of 4"):
    structured.keep_top(scores, 5)
  model = _model()
  params = _init(model)
  heads = np.array([[1, 2], [0, 3]])
  units = np.sort(np.stack([np.arange(32)[::2], np.arange(32)[1::2]]), axis=1)
  small = structured.shrink(params, heads, units)
  small_model = _model(num_heads=2, qkv_dim=8, mlp_dim=16, classifier_dim=32)
  expected = _logits(model, structured.masked(params, heads, units))
  got = _logits(small_model, small)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  assert sum(x.size for x in jax.tree.leaves(small)) < sum(
      x.size for x in jax.tree.leaves(params))


@pytest.mark.slow  # a training run, an export and an evaluation
def test_an_exported_workdir_evaluates_smaller(listops_run, tmp_path):
  run = listops_run  # two layers of two heads, MLP 64
  summary = exports.shrink_workdir(str(run), str(tmp_path / "small"), heads=1,
                                   mlp_units=32, batches=2)
  assert summary["num_heads"] == [2, 1] and summary["mlp_dim"] == [64, 32]
  assert summary["parameters"][1] < summary["parameters"][0]
  stored = json.loads((tmp_path / "small" / "config.json").read_text())
  assert (stored["model"]["num_heads"], stored["model"]["qkv_dim"]) == (1, 16)
  result = evaluate_workdir(str(tmp_path / "small"), "test", checkpoint="best")
  assert result["step"] == summary["step"] and 0.0 <= result["accuracy"] <= 1.0
  with pytest.raises(FileExistsError, match="exists"):
    exports.shrink_workdir(str(run), str(tmp_path / "small"), heads=1)
  # From the command line; a bad family is one line.
  done = subprocess.run([sys.executable, "-m", "effx.structured", f"--workdir={run}",
                         f"--out={tmp_path / 'cli'}", "--mlp_units=16", "--batches=1"],
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "mlp 64 -> 16" in done.stdout


def test_families_with_their_own_heads_are_refused():
  config = models.model_config(dict(kind="classifier", vocab_size=16, max_len=24,
                                    num_classes=10, attention="linformer",
                                    attention_kwargs={"k": 8}))
  with pytest.raises(ValueError, match="head pruning of model.attention='linformer'"):
    structured.check_exportable(config)

"""Quantization with qwix: QAT in the one loop, integer export, sizes, bad input."""

import json
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import qwix

from effx import models
from effx.compress import quant
from effx.training import defaults, exports, metrics, restore, validate
from effx.training import loop as trainer
from effx.bench import students
from conftest import tiny_config

CONFIG = dict(kind="classifier", vocab_size=20, max_len=32, num_classes=3, num_layers=2,
              emb_dim=32, num_heads=4, qkv_dim=32, mlp_dim=64, dropout_rate=0.0,
              attention_dropout_rate=0.0)


def _model_and_params(**overrides):
  model = models.build(models.model_config({**CONFIG, **overrides}))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 32), 1, 20)
  tokens = tokens.at[1, 20:].set(0)  # padding
  # Jitted here and below: one compilation instead of one per operation.
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"])
  return model, params, tokens


def _logits(model, params, tokens):
  return jax.jit(model.apply)({"params": params}, tokens)[0]


def _quant(**values):
  return {**quant.DEFAULTS, **values}


def test_qat_with_every_module_excluded_is_the_float_model():
  model, params, tokens = _model_and_params()
  off = quant.wrap(model, _quant(mode="qat", exclude=".*"))
  np.testing.assert_array_equal(_logits(off, params, tokens), _logits(model, params, tokens))


@pytest.mark.slow  # compiles the float and the QAT model with gradients
def test_qat_keeps_the_tree_and_its_straight_through_gradients_follow_float():
  model, params, tokens = _model_and_params()
  provider = quant.provider(_quant(mode="qat"))
  qat = qwix.quantize_model(model, provider)
  assert jax.tree.structure(nn.unbox(jax.jit(qat.init)(jax.random.PRNGKey(0), tokens)[
      "params"])) == jax.tree.structure(params)
  # Both default rules are used: the mixer's own contractions match the float rule,
  # every projection, feed-forward and head matmul the quantized one.
  assert provider.get_unused_rules() == []

  def loss(m):
    return lambda p: jnp.sum(jnp.square(m.apply({"params": p}, tokens)[0]))

  g_q, g_f = jax.jit(jax.grad(loss(qat)))(params), jax.jit(jax.grad(loss(model)))(params)
  flat_q, flat_f = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
                    for g in (g_q, g_f))
  assert np.all(np.isfinite(flat_q))
  cosine = flat_q @ flat_f / (np.linalg.norm(flat_q) * np.linalg.norm(flat_f))
  assert cosine > 0.99


def _dots(hlo: str) -> list[str]:
  return [line for line in hlo.splitlines() if re.search(r"= \S+ dot\(", line)]


@pytest.mark.slow  # compiles int8 and int4 models
def test_integer_model_runs_s8_dots_and_counts_int4_at_half_a_byte():
  model, params, tokens = _model_and_params()
  int_model = quant.wrap(model, _quant(mode="int"))
  abstract = jax.eval_shape(int_model.init, jax.random.PRNGKey(0), tokens)["params"]
  quantized = quant.quantize_params(params, nn.unbox(abstract))
  layers = quantized["encoder"]["encoder"]["layers"]["block"]["attention_block"]["attention"]
  kernel = layers["query"]["kernel"].array
  assert kernel.qvalue.dtype == jnp.int8 and kernel.scale.shape == (2, 1, 4, 8)
  # Per layer, per output channel: layer 1's scales are its own absmax / 127.5 (qwix's
  # symmetric int8 range).
  w = np.asarray(params["encoder"]["encoder"]["layers"]["block"]["attention_block"]
                 ["attention"]["query"]["kernel"])
  np.testing.assert_allclose(np.asarray(kernel.scale)[1, 0], np.abs(w[1]).max(0) / 127.5,
                             rtol=1e-6)
  hlo = jax.jit(lambda p, x: int_model.apply({"params": p}, x)[0]).lower(
      quantized, tokens).compile().as_text()
  dots = _dots(hlo)
  integer = [d for d in dots if re.search(r"= s32\[", d)]
  # q, k, v, out, wi, wo in the (scanned) layer body and the head's two: s8 x s8 -> s32.
  assert len(integer) == 8, dots
  assert len(dots) - len(integer) == 2  # the mixer's scores and weighted sum stay float
  float_out = _logits(model, params, tokens)
  int_out = _logits(int_model, quantized, tokens)
  assert float(jnp.max(jnp.abs(int_out - float_out))) < 0.05 * float(jnp.max(jnp.abs(float_out)))
  # Sizes from bit widths: an int4 array of 1000 values with 10 float32 scales is 540 bytes.
  q4 = qwix.quantize(jnp.ones((100, 10)), jnp.int4, channelwise_axes=[1])
  assert quant.size_bytes({"w": q4, "b": jnp.ones(5)}) == 500 + 40 + 20
  assert quant.size_bytes(quantized) < 0.4 * quant.size_bytes(params)


def _run(workdir, **overrides):
  return trainer.train_and_evaluate(
      tiny_config("lra_listops", **{"num_train_steps": 20, **overrides}), str(workdir))


@pytest.mark.slow  # three training runs (straight, killed + resumed) and an export
def test_qat_with_pruning_resumes_exactly_and_exports_to_an_integer_workdir(tmp_path):
  options = {"quant.mode": "qat", "prune.method": "magnitude", "prune.target_sparsity": 0.5}
  straight = _run(tmp_path / "straight", **options)
  shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "20")
  resumed = _run(tmp_path / "resumed", **options)
  assert resumed["sessions"][-1]["start_step"] == 10
  assert resumed["final_train_loss"] == straight["final_train_loss"]
  a = ocp.StandardCheckpointer().restore(tmp_path / "straight" / "checkpoints" / "20" / "state")
  b = ocp.StandardCheckpointer().restore(tmp_path / "resumed" / "checkpoints" / "20" / "state")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)

  summary = exports.quantize_workdir(str(tmp_path / "straight"), str(tmp_path / "int8"))
  assert summary["bytes"][1] < 0.5 * summary["bytes"][0]
  saved = ocp.StandardCheckpointer().restore(
      tmp_path / "int8" / "best" / str(summary["step"]) / "params")
  # Every kernel is stored as int8 values plus float scales: no float copy of a weight.
  kernels = {jax.tree_util.keystr(p): v for p, v in
             jax.tree_util.tree_flatten_with_path(saved)[0] if "kernel" in str(p)}
  assert len(kernels) == 2 * 8  # q, k, v, out, wi, wo, head hidden, head logits
  for path, v in kernels.items():
    assert (path.endswith("['qvalue']") and v.dtype == np.int8) or (
        path.endswith("['scale']") and v.size * 8 < max(w.size for w in kernels.values())), \
        (path, v.dtype, v.shape)
  int_test = restore.evaluate_workdir(str(tmp_path / "int8"), "test")
  qat_test = restore.evaluate_workdir(str(tmp_path / "straight"), "test", "best")
  assert int_test["step"] == qat_test["step"]
  assert abs(int_test["accuracy"] - qat_test["accuracy"]) <= 3 / 64  # <= 3 of 64 examples
  # The size / latency / accuracy report over both, each measured in a fresh process.
  rows = students.run([str(tmp_path / "straight"), str(tmp_path / "int8")], ["qat", "int8"],
                      teacher=0, batches=[4], calls=2, warmup=1, timeout_s=300,
                      out=str(tmp_path / "report"))
  assert [r["status"] for r in rows] == ["ok", "ok"], rows
  assert rows[1]["bytes"] == summary["bytes"][1] and rows[1]["disk_bytes"] > 0
  assert rows[1]["test_accuracy"] == int_test["accuracy"]
  # Bytes from bit widths halve; on disk a model this small is mostly checkpoint metadata.
  assert rows[1]["bytes"] < 0.5 * rows[0]["bytes"] and rows[1]["latency_b4_ms"] > 0
  assert rows[1]["size_vs_teacher"] == rows[1]["disk_bytes"] / rows[0]["disk_bytes"]
  for name in ("students.csv", "students.md", "students.png"):
    assert (tmp_path / "report" / name).stat().st_size > 0
  with pytest.raises(ValueError, match="keeps; drop --weight_qtype"):
    exports.quantize_workdir(str(tmp_path / "straight"), str(tmp_path / "int4"), weight_qtype="int4")
  with pytest.raises(ValueError, match="holds one checkpoint"):
    restore.restore(str(tmp_path / "int8"), "10")
  with pytest.raises(ValueError, match="already an integer export"):
    exports.quantize_workdir(str(tmp_path / "int8"), str(tmp_path / "again"))
  with pytest.raises(FileExistsError, match="exists; the export writes a new workdir"):
    exports.quantize_workdir(str(tmp_path / "straight"), str(tmp_path / "int8"))
  with pytest.raises(FileNotFoundError, match="not an effx.train workdir"):
    exports.quantize_workdir(str(tmp_path / "nowhere"), str(tmp_path / "x"))
  int_config = defaults.load_workdir_config(str(tmp_path / "int8"))
  with pytest.raises(ValueError, match="integer export .* for evaluation"):
    trainer.train_and_evaluate(int_config, str(tmp_path / "train_int"))


@pytest.mark.slow  # a training run with a teacher
def test_a_quantized_student_learns_from_a_float_teacher(listops_run, tmp_path):
  student = _run(tmp_path / "student", num_train_steps=5, eval_every_steps=5,
                 checkpoint_every_steps=5, **{
                     "quant.mode": "qat", "quant.weight_qtype": "int4",
                     "quant.act_qtype": "none", "distill.teacher_workdir": str(listops_run),
                     "distill.kd_weight": 1.0})
  assert np.isfinite(student["final_train_loss"])
  assert {"kd", "ce"} <= set(next(r for r in metrics.read(tmp_path / "student")
                                  if r["split"] == "train"))
  config = json.loads((tmp_path / "student" / "config.json").read_text())
  assert config["quant"]["mode"] == "qat"
  assert json.loads((listops_run / "config.json").read_text())["quant"]["mode"] == "none"


@pytest.mark.parametrize("override,match", [
    ({"quant.mode": "fp8"}, "quant.mode='fp8'; one of none, qat, int"),
    ({"quant.weight_qtype": "int2"}, "quant.weight_qtype='int2'; one of int8, int4"),
    ({"quant.act_qtype": "int4"}, "does not compile on XLA:CPU"),
    ({"quant.tile_size": 3}, "quant.tile_size=3 must divide every quantized contraction: "
                             "model.emb_dim=32"),
    ({"quant.include": "("}, "quant.include='\\(' is not a regular expression"),
    ({"quant.bits": 8}, "unknown config key.*quant.bits"),
    ({"model.reversible": True}, "quant needs model.reversible=False"),
    ({"quant.mode": "none", "quant.weight_qtype": "int4"},
     "quant.weight_qtype set but quant.mode is 'none'"),
])
def test_bad_quantization_options(override, match):
  config = tiny_config("lra_listops", **{"quant.mode": "qat", **override})
  with pytest.raises((ValueError, TypeError), match=match):
    validate.config(config)

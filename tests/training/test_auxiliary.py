"""Loss terms and metrics a model reports (the ``losses`` and ``metrics`` collections):
added and reported by every objective through the one loop; adaptive span's spans as
the example."""

import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effx.layers.config import BlockConfig
from effx.layers.stack import Stack
from effx.training import loop as trainer, metrics, objectives
from conftest import tiny_config


class _Reporting(nn.Module):
  """Logits from a sum, sowing a loss term of 0.25 and two per-layer values."""

  @nn.compact
  def __call__(self, inputs, train=False):
    w = self.param("w", nn.initializers.ones, (3,))
    self.sow("losses", "extra", jnp.float32(0.25))
    for layer in range(2):
      self.sow("metrics", "value", jnp.array([layer, 10.0 + layer]))
    del train
    return jnp.broadcast_to(w, (inputs.shape[0], 3)), {}


def test_every_objective_adds_the_models_loss_terms_and_reports_its_metrics():
  model = _Reporting()
  params = {"w": jnp.array([0.0, 1.0, 2.0])}
  batch = {"inputs": jnp.ones((4, 5), jnp.int32), "targets": jnp.array([0, 1, 2, 2])}
  loss, (values, _) = objectives.Classification(model).loss(params, {}, batch,
                                                           jax.random.PRNGKey(0))
  logits = np.array([0.0, 1.0, 2.0])
  ce = np.mean(np.log(np.exp(logits).sum()) - logits[[0, 1, 2, 2]])
  assert float(loss) == pytest.approx(ce + 0.25, rel=1e-6)
  assert {k: float(v) for k, v in values.items() if k.startswith("value/")} == {
      "value/0/0": 0.0, "value/0/1": 10.0, "value/1/0": 1.0, "value/1/1": 11.0}
  # Evaluation neither adds nor reports them.
  sums, _ = objectives.Classification(model).eval_sums(params, {}, {**batch, "weights":
                                                                    jnp.ones(4)})
  assert float(sums["loss"]) / 4 == pytest.approx(ce, rel=1e-6)


def test_a_reversible_stack_refuses_a_family_with_a_loss_term():
  config = BlockConfig(emb_dim=8, num_heads=2, qkv_dim=8, mlp_dim=8, attention="adaptive_span",
                       norm="pre")
  with pytest.raises(ValueError, match="adaptive_span.*adds a loss term.*reversible=False"):
    Stack(config, num_layers=2, reversible=True)


@pytest.mark.slow  # a straight and a resumed training run
def test_adaptive_span_lm_reports_spans_and_resumes_exactly(tmp_path):
  """Spans per layer and head are train metrics; they move, stay in [0, max_span], and a
  run resumed at step 6 (spans in its checkpoint) ends where a straight one does."""
  config = tiny_config("lm_enwik8", num_train_steps=12, checkpoint_every_steps=6,
                       eval_every_steps=6, learning_rate=3e-2)
  config.model.attention = "adaptive_span"
  config.model.attention_kwargs = {"max_span": 16, "ramp": 4, "init_span": 0.5,
                                   "span_loss": 1e-3}
  trainer.train_and_evaluate(config, str(tmp_path / "a"))
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "12")  # as if killed after step 6's
  trainer.train_and_evaluate(config, str(tmp_path / "b"))
  rows = {w: sorted((r["split"], r["step"], sorted(r.items())) for r in
                    metrics.read(str(tmp_path / w)) if r["split"] == "train")
          for w in "ab"}
  strip = lambda rows: [[kv for kv in r[2] if "per_s" not in kv[0]] for r in rows]  # noqa: E731
  assert strip(rows["a"]) == strip(rows["b"])
  last = dict(rows["a"][-1][2])
  spans = {k: v for k, v in last.items() if k.startswith("span/")}
  layers, heads = config.model.num_layers, config.model.num_heads
  assert len(spans) == layers * heads
  assert all(0.0 <= v <= 16.0 for v in spans.values())
  assert any(abs(v - 8.0) > 1e-3 for v in spans.values())  # they learned

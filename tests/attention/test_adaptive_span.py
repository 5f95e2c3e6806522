"""Adaptive attention span against an oracle of the paper's equations, written afresh."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effx.attention as ea
from effx.attention.adaptive_span import adaptive_span_attention, ramp_mask, reach, widths
from effx.training import optim
from support import padding_mask, qkv


def oracle(q, k, v, span, mask, *, causal, max_span, ramp):
  """Sukhbaatar et al. (2019), eq. 3-4 as written: ``a_ij = m(x) e^{s_ij} / sum m(x)
  e^{s_ij'}`` with ``m(x) = clamp((R + z - x) / R, 0, 1)``, keys no farther than
  ``max_span``, over real keys; in the dtype of its inputs (float64 under x64)."""
  b, length, h, d = q.shape
  s = jnp.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(d)
  i, j = np.arange(length)[:, None], np.arange(length)[None, :]
  x = (i - j) if causal else np.abs(i - j)
  m = jnp.clip((ramp + span[:, None, None] - x) / ramp, 0.0, 1.0)
  m = m * ((x >= 0) & (x <= max_span))
  m = m[None] * mask[:, None, None, :]
  e = jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True))) * m
  den = e.sum(-1, keepdims=True)  # 0 for a padded query far from every real key
  out = jnp.einsum("bhij,bjhd->bihd", e / jnp.where(den > 0, den, 1.0), v)
  return out * mask[:, :, None, None]


# length, causal, max_span, ramp, spans (tokens): one block both ways, several blocks
# (three band widths) causal. No span
# puts a weight exactly at 0 on a key (z + R an integer): there the ramp has no
# derivative, and the two sides' conventions differ (effx takes the left one, 0).
CASES = [
    (37, False, 12, 4, (0.25, 3.5, 12.0)),
    (37, True, 12, 4, (0.5, 7.25, 10.5)),
    (200, True, 100, 16, (5.3, 60.3, 90.7)),
]


@pytest.mark.parametrize("length,causal,max_span,ramp,spans", CASES)
def test_outputs_and_gradients_equal_the_oracle(length, causal, max_span, ramp, spans):
  q, k, v = qkv(seed=length, length=length)
  mask = padding_mask(2, length)
  span = jnp.asarray(spans, jnp.float32)
  kw = dict(causal=causal, max_span=max_span, ramp=ramp)

  def loss(f, q, k, v, span):
    return jnp.sum(f(q, k, v, span) ** 2)

  ours = lambda q, k, v, s: adaptive_span_attention(q, k, v, s, mask=mask, **kw)  # noqa: E731
  out = ours(q, k, v, span)
  grads = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2, 3))(q, k, v, span)
  with jax.enable_x64(True):
    q64, k64, v64, s64 = (jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v, span))
    ref = lambda q, k, v, s: oracle(q, k, v, s, jnp.asarray(mask, jnp.float64), **kw)  # noqa: E731
    want = np.asarray(ref(q64, k64, v64, s64))
    want_grads = [np.asarray(g) for g in
                  jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2, 3))(q64, k64, v64, s64)]
  np.testing.assert_allclose(out, want, atol=2e-6)  # float32 against float64
  for got, g in zip(grads, want_grads):
    np.testing.assert_allclose(got, g, atol=2e-5, rtol=1e-4)
  assert np.abs(want_grads[3]).max() > 0  # the spans do get a gradient


def test_ramp_by_hand():
  # R = 32, z = 10: weight 1 up to distance 10, (42 - x) / 32 on the ramp, 0 from 42 on.
  got = ramp_mask(jnp.array([0.0, 10.0, 11.0, 33.0, 41.0, 42.0, 50.0]), 10.0, 32)
  np.testing.assert_allclose(got, [1.0, 1.0, 31 / 32, 9 / 32, 1 / 32, 0.0, 0.0])


def test_a_span_grows_when_far_keys_help():
  """Values that pay off only far away: the loss falls as the span grows (negative
  gradient), and rises with it when only near keys pay."""
  length = 96
  q = jnp.zeros((1, length, 1, 4))
  k = jnp.zeros((1, length, 1, 4))
  dist = np.arange(length)[-1] - np.arange(length)
  far = jnp.asarray((dist > 20).astype(np.float32))[None, :, None, None]
  span = jnp.array([10.0])

  def loss(span, v):  # minus the last query's output: it wants large values
    out = adaptive_span_attention(q, k, v, span, causal=True, max_span=64, ramp=16)
    return -out[0, -1, 0, 0]

  assert float(jax.grad(loss)(span, far)[0]) < 0
  assert float(jax.grad(loss)(span, 1.0 - far)[0]) > 0


def test_the_band_is_trimmed_to_the_spans():
  # Widths compiled: powers of two of 64-token blocks up to the one covering max_span.
  assert widths(1024, 512, 64) == (0, 1, 2, 4, 8)
  assert widths(1024, 300, 64) == (0, 1, 2, 4, 5)
  assert widths(37, 12, 37) == (0,)
  # The farthest weighted distance follows the largest span (z + R - 1), capped.
  assert int(reach(jnp.array([3.0, 40.2]), 512, 32)) == 72
  assert int(reach(jnp.array([600.0]), 512, 32)) == 512
  # Compiled temporaries of the training step grow with max_span.
  def temps(max_span):
    q, k, v = qkv(length=512, batch=1, heads=2, dim=16)
    f = jax.jit(jax.grad(lambda q, k, v, s: jnp.sum(adaptive_span_attention(
        q, k, v, s, causal=True, max_span=max_span) ** 2), argnums=(0, 3)))
    return f.lower(q, k, v, jnp.ones((2,))).compile().memory_analysis().temp_size_in_bytes
  small, large = temps(64), temps(448)
  assert large > 2.5 * small


def test_the_training_step_keeps_span_fractions_in_range():
  params = {"mixer": {"span_fraction": jnp.array([-0.05, 0.4, 1.2])}, "w": jnp.array([5.0])}
  new = optim.project_to_bounds(params)
  np.testing.assert_allclose(new["mixer"]["span_fraction"], [0.0, 0.4, 1.0], atol=1e-7)
  np.testing.assert_allclose(new["w"], [5.0])  # other parameters are not bounded


def test_the_penalty_and_spans_are_sown_in_training_only():
  module = ea.make("adaptive_span", max_span=40, init_span=0.25, span_loss=0.01)
  q, k, v = qkv()
  variables = module.init(jax.random.PRNGKey(0), q, k, v)
  assert set(variables) == {"params"}  # nothing sown at initialisation
  _, sown = module.apply(variables, q, k, v, mutable=["losses", "metrics"])
  np.testing.assert_allclose(sown["losses"]["span"], 0.01 * 10.0, rtol=1e-6)
  np.testing.assert_allclose(sown["metrics"]["span"], [10.0] * 3)

  class Twice(nn.Module):  # a dual encoder calls its layers twice
    @nn.compact
    def __call__(self, q, k, v):
      mixer = ea.make("adaptive_span", max_span=40, init_span=0.25, span_loss=0.01,
                      module_name="mixer")
      return mixer(q, k, v) + mixer(q, k, v)

  twice = Twice()
  _, sown = twice.apply(twice.init(jax.random.PRNGKey(0), q, k, v), q, k, v,
                        mutable=["losses", "metrics"])
  np.testing.assert_allclose(sown["losses"]["mixer"]["span"], 0.01 * 10.0, rtol=1e-6)


def test_bad_options_are_one_message():
  with pytest.raises(ValueError, match="init_span=1.5 must be in"):
    ea.make("adaptive_span", init_span=1.5)
  with pytest.raises(ValueError, match="max_span=0"):
    ea.make("adaptive_span", max_span=0)
  with pytest.raises(ValueError, match="span_loss=-1"):
    ea.make("adaptive_span", span_loss=-1.0)

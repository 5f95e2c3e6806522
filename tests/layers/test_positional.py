"""Positional encodings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effx.attention import SelfAttention
from effx.layers import positional


def test_sinusoidal_matches_the_formula():
  table = positional.sinusoidal(jnp.arange(6), 8)
  freqs = np.exp(-np.log(10_000.0) * np.arange(4) / 3)
  want = np.concatenate([np.sin(np.arange(6)[:, None] * freqs),
                         np.cos(np.arange(6)[:, None] * freqs)], axis=1)
  np.testing.assert_allclose(table, want, atol=1e-6)


def test_rotary_scores_depend_on_relative_position_only():
  q, k = jax.random.normal(jax.random.PRNGKey(0), (2, 1, 1, 1, 8))

  def score(i, j):
    qi = positional.apply_rotary(q, jnp.array([[i]]))
    kj = positional.apply_rotary(k, jnp.array([[j]]))
    return float(jnp.sum(qi * kj))

  assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-5)
  assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)
  norms = jnp.linalg.norm(positional.apply_rotary(q, jnp.array([[7]])))
  assert float(norms) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-6)


def test_shortformer_positions_reach_queries_and_keys_only():
  """qk_input changes the attention weights; values are always computed from x."""
  layer = SelfAttention(num_heads=2, qkv_features=8)
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 8))
  variables = layer.init(jax.random.PRNGKey(0), x)
  plain = layer.apply(variables, x)
  infused = layer.apply(variables, x, qk_input=x + positional.sinusoidal(jnp.arange(5), 8))
  assert not np.allclose(infused, plain)
  # Identical queries/keys at every position make attention uniform: the output is then
  # the mean of the values, which must be projections of x, not of qk_input.
  uniform = layer.apply(variables, x, qk_input=jnp.zeros_like(x))
  p = variables["params"]
  values = jnp.einsum("bld,dhk->blhk", x, p["value"]["kernel"].value) + p["value"]["bias"].value
  want = jnp.einsum("bhk,hkd->bd", values.mean(axis=1), p["out"]["kernel"].value)
  np.testing.assert_allclose(uniform[:, 0], want + p["out"]["bias"].value, atol=1e-5)


def test_learned_positions_table():
  module = positional.AbsolutePositions("learned", max_len=10, dim=4)
  variables = module.init(jax.random.PRNGKey(0), jnp.arange(3)[None])
  table = variables["params"]["pos_embedding"].value
  out = module.apply(variables, jnp.array([[2, 0]]))
  np.testing.assert_array_equal(out[0], table[jnp.array([2, 0])])

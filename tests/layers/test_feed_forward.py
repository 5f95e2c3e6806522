"""Chunked feed-forward: same parameters, outputs and gradients; less memory."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effx.bench.memory import feed_forward_memory
from effx.layers.feed_forward import FeedForward

X = jax.random.normal(jax.random.PRNGKey(0), (2, 37, 16))


@pytest.mark.parametrize("chunk", [8, 10, 37])
def test_chunked_equals_unchunked(chunk):
  plain = FeedForward(mlp_dim=64)
  chunked = FeedForward(mlp_dim=64, chunk_size=chunk)
  params = jax.jit(plain.init)(jax.random.PRNGKey(1), X)
  assert jax.tree.structure(params) == jax.tree.structure(
      jax.eval_shape(chunked.init, jax.random.PRNGKey(1), X))

  def loss(layer):
    return lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x)))

  @jax.jit
  def both(params, x):  # outputs and gradients of both layers, one compiled program
    return (chunked.apply(params, x), plain.apply(params, x),
            jax.grad(loss(chunked), argnums=(0, 1))(params, x),
            jax.grad(loss(plain), argnums=(0, 1))(params, x))

  out, out_plain, grads, want = both(params, X)
  np.testing.assert_allclose(out, out_plain, atol=1e-6)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_chunked_dropout_is_seeded():
  layer = FeedForward(mlp_dim=64, chunk_size=8, dropout_rate=0.5)
  params = layer.init(jax.random.PRNGKey(1), X)
  run = lambda seed: layer.apply(params, X, False, rngs={"dropout": jax.random.PRNGKey(seed)})  # noqa: E731
  np.testing.assert_array_equal(run(3), run(3))
  assert not np.allclose(run(3), run(4))


def test_peak_memory_falls_with_chunk_size():
  """Forward+backward temporaries at length 16384, mlp_dim 1024 (compiled)."""
  mem = [feed_forward_memory(16384, c) for c in (None, 4096, 1024)]
  assert mem[0] > mem[1] > mem[2], mem
  assert mem[2] < mem[0] / 4, mem


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_chunk_size(bad):
  with pytest.raises(ValueError, match=f"ff_chunk_size={bad}"):
    FeedForward(mlp_dim=8, chunk_size=bad)


def test_parameters_are_annotated():
  specs = nn.get_partition_spec(FeedForward(mlp_dim=8).init(jax.random.PRNGKey(0), X))
  assert tuple(specs["params"]["mlp"]["wi"]["kernel"]) == ("embed", "mlp")

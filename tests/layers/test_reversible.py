"""Reversible stack: exact gradients without stored activations; memory flat in depth."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from support import padding_mask
from effx.bench.memory import stack_memory
from effx.layers import reversible
from effx.layers.config import BlockConfig
from effx.layers.stack import Stack

X = jax.random.normal(jax.random.PRNGKey(0), (2, 24, 16))
MASK = padding_mask(2, 24)
# What the reversible backward must reproduce differs by family: nothing (dense, standing
# for every deterministic family without parameters, local included: the stack does not
# look inside the family), hashing randomness (lsh), features redrawn from the dropout
# stream (performer), parameters of the family's own (sinkhorn).
FAMILIES = [("dense", ()), ("lsh", (("bucket_size", 8),)),
            ("performer", (("num_features", 16), ("redraw", True))),
            ("sinkhorn", (("block_size", 8), ("max_len", 32)))]


def _config(attention, kwargs, **extra):
  return BlockConfig(emb_dim=16, num_heads=2, qkv_dim=16, mlp_dim=32, dropout_rate=0.1,
                     attention_dropout_rate=0.1, attention=attention, attention_kwargs=kwargs,
                     **extra)


_PARAMS: dict = {}


def _params(stack, attention):
  """Initial parameters, compiled once and shared by the families without parameters of
  their own (all here but sinkhorn), which have exactly dense attention's tree."""
  key = attention if attention == "sinkhorn" else "shared"
  if key not in _PARAMS:
    _PARAMS[key] = jax.jit(lambda rng: stack.init(rng, X, MASK, True))(
        jax.random.PRNGKey(1))["params"]
  return _PARAMS[key]


@pytest.mark.parametrize("attention,kwargs", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_gradients_equal_plain_autodiff(attention, kwargs, monkeypatch):
  """Loss and gradients (inputs, parameters) through the custom backward equal autodiff
  of the same forward pass, with dropout on; losses on per-layer outputs included."""
  stack = Stack(_config(attention, kwargs, ff_chunk_size=8), num_layers=3, reversible=True)
  params = _params(stack, attention)
  w = jax.random.normal(jax.random.PRNGKey(2), X.shape)

  def loss(params, x):
    y, aux = stack.apply({"params": params}, x, MASK, False,
                         rngs={"dropout": jax.random.PRNGKey(3)})
    return (jnp.sum(y * w) + jnp.sum(jnp.sin(aux["hidden"][1]))
            + jnp.sum(aux["attention"][0] * w[..., :8]))

  got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, X)
  original = reversible._reversible_fn
  # .fun is the custom_vjp's primal function: plain autodiff of the same forward pass.
  monkeypatch.setattr(reversible, "_reversible_fn", lambda *a: original(*a).fun)
  want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, X)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want[1]))
  for g, v in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(g, v, atol=1e-5 * scale)


@functools.lru_cache(maxsize=None)
def _temp(layers, mode):
  kwargs = {"reversible": mode == "reversible", "remat": mode if mode != "reversible" else "none"}
  return stack_memory(layers, 4096, **kwargs)["temp"]


@pytest.mark.slow  # compiles models of several depths
def test_reversible_memory_is_flat_in_depth():
  """Compiled forward+backward temporaries at length 4096 (width 128, dense attention)."""
  assert _temp(12, "reversible") < 1.3 * _temp(2, "reversible")
  assert _temp(12, "none") > 3.0 * _temp(2, "none")  # plain grows with depth
  assert _temp(12, "full") < 1.3 * _temp(2, "full")   # so does not full remat


@pytest.mark.parametrize("config,match", [
    (dict(emb_dim=15, num_heads=3, qkv_dim=15), "emb_dim=15 must be even"),
    (dict(attention="routing"), "mutable state"),
    (dict(remat="full"), "remat='none'"),
])
def test_refuses_what_it_cannot_run(config, match):
  cfg = {"emb_dim": 16, "num_heads": 2, "qkv_dim": 16, "mlp_dim": 32, **config}
  with pytest.raises(ValueError, match=match):
    Stack(BlockConfig(**cfg), num_layers=2, reversible=True)

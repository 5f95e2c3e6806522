"""Segment memory: Transformer-XL equivalence, compressive memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effx import models

TOKENS = jax.random.randint(jax.random.PRNGKey(0), (2, 32), 1, 50)
SEGMENT = 8


def _lm(**overrides):
  cfg = dict(kind="causal_lm", vocab_size=50, max_len=64, num_layers=2, emb_dim=16, num_heads=2,
             qkv_dim=16, mlp_dim=32, dropout_rate=0.0, positional="rotary", mem_len=32)
  return models.build({**cfg, **overrides})


@pytest.mark.parametrize("attention,kwargs,positional", [
    ("dense", {}, "rotary"),
    ("local", {"window": 5}, "sinusoidal"),
    ("performer", {"num_features": 16}, "shortformer"),
    ("sparse", {"stride": 4}, "rotary"),
    ("cosformer", {"max_len": 64}, "rotary"),
])
def test_segments_with_full_memory_equal_one_causal_pass(attention, kwargs, positional):
  """Families whose pattern is set by positions; content-routed ones (lsh, routing) hash
  [memory; segment] together, which is not the same as hashing the whole sequence."""
  model = _lm(attention=attention, attention_kwargs=kwargs, positional=positional)
  variables = model.init(jax.random.PRNGKey(1), TOKENS[:, :SEGMENT])
  apply = jax.jit(model.apply)
  full, _ = apply(variables, TOKENS)
  memory, pieces = None, []
  for start in range(0, TOKENS.shape[1], SEGMENT):
    logits, aux = apply(variables, TOKENS[:, start:start + SEGMENT], memory=memory)
    memory = aux["memory"]
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5)


def test_memory_keeps_the_newest_states_and_stops_gradients():
  model = _lm(mem_len=12)
  variables = model.init(jax.random.PRNGKey(1), TOKENS[:, :SEGMENT])
  memory = None
  for start in (0, 8, 16):
    _, aux = model.apply(variables, TOKENS[:, start:start + SEGMENT], memory=memory)
    memory = aux["memory"]
  assert memory["hidden"].shape == (2, 2, 12, 16)               # [layers, batch, mem, width]
  np.testing.assert_array_equal(memory["positions"][0], np.arange(12, 24))
  assert bool(memory["valid"].all()) and int(memory["next_position"][0]) == 24

  def loss(params):
    _, aux = model.apply({"params": params}, TOKENS[:, :SEGMENT])
    return jnp.sum(aux["memory"]["hidden"])

  grads = jax.grad(loss)(variables["params"])
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


@functools.lru_cache(maxsize=None)
def _compressive(compression):
  return _lm(mem_len=8, compressed_len=6, compression_rate=2, compression=compression)


@pytest.mark.parametrize("compression", ["mean", "max", "conv"])
def test_compressed_memory_shapes_and_lengths(compression):
  model = _compressive(compression)
  variables = model.init(jax.random.PRNGKey(1), TOKENS[:, :SEGMENT])
  memory = None
  for start in range(0, 32, SEGMENT):
    _, aux = model.apply(variables, TOKENS[:, start:start + SEGMENT], memory=memory)
    memory = aux["memory"]
  assert memory["hidden"].shape == (2, 2, 8, 16)
  assert memory["compressed"].shape == (2, 2, 6, 16)
  # After 32 tokens: memory holds 24..31; 0..23 were evicted in pairs, the newest six
  # pairs (12..23) are compressed, each labelled by its last position.
  np.testing.assert_array_equal(memory["positions"][0], np.arange(24, 32))
  np.testing.assert_array_equal(memory["compressed_positions"][0], np.arange(13, 24, 2))
  assert bool(memory["compressed_valid"].all())
  assert ("compress" in variables["params"]["decoder"]["layers"]) == (compression == "conv")


def test_compression_loss_decreases():
  """The learned (conv) compression trains on the attention-reconstruction loss."""
  model = _compressive("conv")
  params = model.init(jax.random.PRNGKey(1), TOKENS[:, :SEGMENT])["params"]

  def loss(params):
    memory, total = None, 0.0
    for start in range(0, 32, SEGMENT):
      _, aux = model.apply({"params": params}, TOKENS[:, start:start + SEGMENT], memory=memory)
      memory, total = aux["memory"], total + aux["compression_loss"]
    return total

  opt = optax.adam(1e-2)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return value, optax.apply_updates(params, updates), state

  losses = []
  for _ in range(15):
    value, params, state = step(params, state)
    losses.append(float(value))
  assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("overrides,match", [
    (dict(compressed_len=4, mem_len=0), "needs model.mem_len > 0"),
    (dict(compression="zip"), "compression='zip'"),
    (dict(positional="learned"), "positional='learned'"),
    (dict(reversible=True), "does not support segment memory"),
    (dict(attention="bigbird"), "cannot be causal"),
])
def test_bad_memory_options(overrides, match):
  with pytest.raises(ValueError, match=match):
    _lm(**overrides)

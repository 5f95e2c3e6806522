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


_CONFIG = dict(kind="causal_lm", vocab_size=50, max_len=64, num_layers=2, emb_dim=16,
               num_heads=2, qkv_dim=16, mlp_dim=32, dropout_rate=0.0, positional="rotary",
               mem_len=32)


def _lm(**overrides):
  return models.build({**_CONFIG, **overrides})


@functools.lru_cache(maxsize=None)
def _shared_variables():
  """Initialised once for the models without compression: their families, positional
  encodings (not "learned") and memory lengths add no parameters."""
  return jax.jit(_lm().init)(jax.random.PRNGKey(1), TOKENS[:, :SEGMENT])


def _segments(model, variables, tokens):
  """Logits and memory of ``tokens`` fed one segment at a time, one compiled program per
  model. The first segment starts from ``model.initial_memory`` (what ``memory=None``
  means)."""
  apply = jax.jit(model.apply)
  memory, pieces = model.initial_memory(tokens.shape[0]), []
  for start in range(0, tokens.shape[1], SEGMENT):
    logits, aux = apply(variables, tokens[:, start:start + SEGMENT], memory=memory)
    memory = aux["memory"]
    pieces.append(logits)
  return jnp.concatenate(pieces, axis=1), memory


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
  variables = _shared_variables()
  full, _ = jax.jit(model.apply)(variables, TOKENS)
  pieces, _ = _segments(model, variables, TOKENS)
  np.testing.assert_allclose(pieces, full, atol=1e-5)


def test_memory_keeps_the_newest_states_and_stops_gradients():
  model = _lm(mem_len=12)
  variables = _shared_variables()
  _, memory = _segments(model, variables, TOKENS[:, :24])
  assert memory["hidden"].shape == (2, 2, 12, 16)               # [layers, batch, mem, width]
  np.testing.assert_array_equal(memory["positions"][0], np.arange(12, 24))
  assert bool(memory["valid"].all()) and int(memory["next_position"][0]) == 24

  def loss(params):
    _, aux = model.apply({"params": params}, TOKENS[:, :SEGMENT])
    return jnp.sum(aux["memory"]["hidden"])

  grads = jax.jit(jax.grad(loss))(variables["params"])
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


@functools.lru_cache(maxsize=None)
def _compressive(compression):
  return _lm(mem_len=8, compressed_len=6, compression_rate=2, compression=compression)


@functools.lru_cache(maxsize=None)
def _compressive_variables(compression):
  """Mean and max compression have the same parameters (max uses mean's); conv adds its
  own."""
  if compression == "max":
    return _compressive_variables("mean")
  return jax.jit(_compressive(compression).init)(jax.random.PRNGKey(1), TOKENS[:, :SEGMENT])


@pytest.mark.parametrize("compression", ["mean", "max", "conv"])
def test_compressed_memory_shapes_and_lengths(compression):
  model = _compressive(compression)
  variables = _compressive_variables(compression)
  _, memory = _segments(model, variables, TOKENS)
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
  params = _compressive_variables("conv")["params"]
  segments = TOKENS.reshape(2, -1, SEGMENT).swapaxes(0, 1)  # [segments, batch, SEGMENT]

  def loss(params):
    # One segment per scan step, from the empty memory (what memory=None starts from).
    def one(memory, tokens):
      _, aux = model.apply({"params": params}, tokens, memory=memory)
      return aux["memory"], aux["compression_loss"]

    _, losses = jax.lax.scan(one, model.initial_memory(2), segments)
    return jnp.sum(losses)

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

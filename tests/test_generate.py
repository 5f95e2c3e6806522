"""Incremental decoding: every decodable family's step-by-step logits equal the full causal
forward (teacher forcing), prompts of different lengths share a batch, sampling follows
its seed, and what cannot decode says so."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effx.models import generate
from effx import models
import effx.attention as ea
from effx.attention import registry

VOCAB = 50


_TOKENS = jax.random.randint(jax.random.PRNGKey(0), (3, 20), 1, VOCAB)


def _lm(attention="dense", kwargs=None, **overrides):
  cfg = dict(kind="causal_lm", vocab_size=VOCAB, max_len=64, num_layers=2, emb_dim=16,
             num_heads=2, qkv_dim=16, mlp_dim=32, dropout_rate=0.0, positional="rotary",
             attention=attention, attention_kwargs=kwargs or {})
  model = models.build({**cfg, **overrides})
  return model, _variables(model)["params"], _TOKENS


@functools.lru_cache(maxsize=None)
def _has_own_variables(attention, kwargs):
  q = jax.ShapeDtypeStruct((1, 20, 2, 8), jnp.float32)
  module = ea.make(attention, causal=True, **dict(kwargs))
  return bool(jax.tree.leaves(jax.eval_shape(module.init, jax.random.PRNGKey(0), q, q, q)))


_VARIABLES: dict = {}


def _variables(model):
  """The model's initial variables, compiled once per parameter tree: a family without
  variables of its own has exactly dense attention's tree, and segment memory adds none,
  so those share the dense model's (same positional encoding) variables."""
  cfg = model.config
  kwargs = tuple(sorted(dict(cfg.attention_kwargs).items()))
  own = _has_own_variables(cfg.attention, kwargs)
  key = (cfg.attention, kwargs) if own else ("dense", cfg.positional)
  if key not in _VARIABLES:
    init_model = model if own else models.build(dict(
        kind="causal_lm", vocab_size=VOCAB, max_len=64, num_layers=2, emb_dim=16,
        num_heads=2, qkv_dim=16, mlp_dim=32, dropout_rate=0.0, positional=cfg.positional))
    _VARIABLES[key] = jax.jit(init_model.init)(jax.random.PRNGKey(1), _TOKENS)
  return _VARIABLES[key]


DECODABLE = [
    ("dense", {}), ("blockwise", {"q_chunk": 8, "k_chunk": 8}), ("local", {"window": 5}),
    ("dilated", {"window": 3, "dilation": (1, 2)}), ("linear", {}),
    ("performer", {"num_features": 16}), ("cosformer", {"max_len": 64}),
    ("sparse", {"stride": 4}), ("sparse", {"stride": 4, "pattern": "fixed", "summary": 2}),
    ("longformer", {"window": 3, "global_tokens": (0, 5)}),
    ("adaptive_span", {"max_span": 8, "ramp": 4, "init_span": 0.3}),
]


def test_the_list_covers_every_decodable_family():
  assert sorted({n for n, _ in DECODABLE}) == sorted(
      n for n in registry.names() if registry.get(n).decodable)


@pytest.mark.parametrize("attention,kwargs,positional", [
    *[(a, k, "rotary") for a, k in DECODABLE], ("dense", {}, "learned"),
    ("local", {"window": 5}, "shortformer"), ("linear", {}, "sinusoidal")])
def test_decoding_equals_the_forward_at_every_position(attention, kwargs, positional):
  model, params, tokens = _lm(attention, kwargs, positional=positional)
  tokens = tokens.at[1, 13:].set(0)  # a shorter row, padded at the end
  full, _ = jax.jit(model.apply)({"params": params}, tokens)
  stepped = generate.decode_logits(model, params, tokens)
  real = np.asarray(tokens) > 0
  np.testing.assert_allclose(np.asarray(stepped)[real], np.asarray(full)[real], atol=1e-5)


def test_segment_memory_models_decode_through_their_memory():
  model, params, tokens = _lm(mem_len=32)
  assert generate.decode_mode(model) == "memory"
  full, _ = jax.jit(model.apply)({"params": params}, tokens)
  stepped = generate.decode_logits(model, params, tokens)
  np.testing.assert_allclose(stepped, full, atol=1e-5)


@pytest.mark.parametrize("attention,kwargs", [("synthesizer", {}), ("sinkhorn", {}),
                                              ("routing", {})])
def test_recompute_decodes_families_without_a_state(attention, kwargs):
  """Exact for these: their causal output at a position ignores later (padded) ones."""
  model, params, tokens = _lm(attention, kwargs)
  variables = _variables(model)
  state = {k: v for k, v in variables.items() if k != "params"}  # routing's centroids
  with pytest.raises(ValueError, match="cannot decode token by token.*recompute=True"):
    generate.decode_mode(model)
  full, _ = jax.jit(model.apply)(variables, tokens)
  stepped = generate.decode_logits(model, params, tokens, recompute=True, model_state=state)
  np.testing.assert_allclose(stepped, full, atol=1e-5)


def test_prompts_of_different_lengths_continue_as_alone():
  model, params, _ = _lm("local", {"window": 4})
  prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
  together = generate.generate(model, params, prompts, 4, temperature=0)
  alone = generate.generate(model, params, prompts[1:], 4, temperature=0)[0]
  np.testing.assert_array_equal(together[1], alone)
  # Greedy decoding is the argmax (padding excluded) of the forward over what came before.
  seq = jnp.asarray([prompts[0] + together[0].tolist()])
  logits, _ = jax.jit(model.apply)({"params": params}, seq)
  np.testing.assert_array_equal(jnp.argmax(logits[0, 2:-1, 1:], -1) + 1, together[0])


def test_sampling_follows_the_seed_and_top_k():
  model, params, _ = _lm("linear")
  prompts = [[1, 2, 3], [4, 5]]
  a = generate.generate(model, params, prompts, 8, seed=3, top_k=5)
  b = generate.generate(model, params, prompts, 8, seed=3, top_k=5)
  c = generate.generate(model, params, prompts, 8, seed=4, top_k=5)
  assert all((x == y).all() for x, y in zip(a, b))
  assert any((x != y).any() for x, y in zip(a, c))
  one = generate.generate(model, params, prompts, 8, seed=3, top_k=1)
  greedy = generate.generate(model, params, prompts, 8, temperature=0)
  assert all((x == y).all() for x, y in zip(one, greedy))
  assert all(((x > 0) & (x < VOCAB)).all() for x in a)


def test_sample_never_draws_padding():
  logits = jnp.zeros((4, 6)).at[:, 0].set(100.0)
  draws = generate.sample(logits, jax.random.PRNGKey(0), 1.0, None)
  assert (np.asarray(draws) > 0).all()


@pytest.mark.parametrize("call,match", [
    (lambda m, p: generate.generate(m, p, [[1, 2]], 4, top_k=0), "top_k=0 must be"),
    (lambda m, p: generate.generate(m, p, [[1, 2]], 0), "max_new_tokens=0"),
    (lambda m, p: generate.generate(m, p, [[1, 2]], 4, temperature=-1.0), "temperature"),
    (lambda m, p: generate.generate(m, p, [[1, 0]], 4), "ids outside 1..49"),
    (lambda m, p: generate.generate(m, p, [[1] * 60], 10), "exceed model.max_len=64"),
])
def test_bad_requests_name_the_problem(call, match):
  model, params, _ = _lm(positional="learned")
  with pytest.raises(ValueError, match=match):
    call(model, params)


def test_lsh_without_recompute_says_how():
  model, params, _ = _lm("lsh", {"bucket_size": 4})
  with pytest.raises(ValueError, match="'lsh' cannot decode token by token"):
    generate.generate(model, params, [[1, 2]], 4)
  assert len(generate.generate(model, params, [[1, 2]], 4, recompute=True)[0]) == 4


def test_cosformer_needs_a_fixed_horizon():
  model, params, _ = _lm("cosformer", {})
  with pytest.raises(ValueError, match="only with option max_len set"):
    generate.generate(model, params, [[1, 2]], 4)


def test_decode_state_is_constant_for_kernel_families_and_grows_for_dense():
  def size(attention, kwargs, capacity):
    model = models.build(dict(kind="causal_lm", vocab_size=VOCAB, num_layers=2, emb_dim=16,
                              num_heads=2, qkv_dim=16, mlp_dim=32, attention=attention,
                              attention_kwargs=kwargs, positional="rotary"))
    state = jax.eval_shape(lambda: model.init_cache(1, capacity))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  assert size("linear", {}, 16) == size("linear", {}, 4096)
  assert size("local", {"window": 8}, 64) == size("local", {"window": 8}, 4096)
  assert size("dense", {}, 4096) > 60 * size("dense", {}, 64)

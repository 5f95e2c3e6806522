"""Models built from config: a train step per family, pooling, aux, errors, NNX."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
import flax.linen as nn

import effx.attention as ea
from effx import models
from support import SMALL

BASE = dict(vocab_size=20, max_len=40, num_classes=3, num_layers=2, emb_dim=16, num_heads=2,
            qkv_dim=16, mlp_dim=32, dropout_rate=0.1)
TOKENS = jax.random.randint(jax.random.PRNGKey(0), (2, 24), 1, 20).at[1, 15:].set(0)
TOKENS2 = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 1, 20).at[0, 9:].set(0)
LABELS = jnp.array([0, 2])


def _options(name):
  options = dict(SMALL.get(name, {}))
  if "max_len" in options:
    options["max_len"] = 64
  if name == "dilated":
    options["dilation"] = 2  # per-head tuples need 3 heads; these models have 2
  return options


@functools.lru_cache(maxsize=None)
def _has_own_variables(name):
  """Whether the family itself has variables (parameters or state such as routing's
  centroids); the others give exactly dense attention's parameter tree
  (``test_self_attention.test_parameter_tree``)."""
  q = jax.ShapeDtypeStruct((1, 24, 2, 8), jnp.float32)
  module = ea.make(name, **_options(name))
  return bool(jax.tree.leaves(jax.eval_shape(module.init, jax.random.PRNGKey(0), q, q, q)))


@functools.lru_cache(maxsize=None)
def _shared_variables(kind, args_key):
  """Initialised variables of the dense model of ``kind``: compiled once and reused by
  every family without variables of its own (initialisation is a third of a train
  step's compile time)."""
  config = _KIND_CONFIGS[kind]
  model = models.build(dict(config, attention="dense"))
  return jax.jit(model.init)(jax.random.PRNGKey(0), *_ARGS[args_key])


def _variables(model, kind, args_key):
  if _has_own_variables(model.config.attention):
    return jax.jit(model.init)(jax.random.PRNGKey(0), *_ARGS[args_key])
  return _shared_variables(kind, args_key)


def _train_step(model, kind, args_key, targets):
  """One AdamW step from the model's initial variables, compiled as one program. Returns
  the loss, whether every updated parameter is finite, and the largest gradient entry of
  the attention's value projection (non-zero: the family's output reaches the loss)."""
  args = _ARGS[args_key]
  variables = _variables(model, kind, args_key)
  opt = optax.adamw(1e-3)

  @jax.jit
  def step(variables, key):
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}

    def loss_fn(params):
      (logits, aux), new_state = model.apply({"params": params, **state}, *args, train=True,
                                             rngs={"dropout": key}, mutable=list(state))
      labels = targets if logits.ndim == 2 else args[0]
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss + aux.get("compression_loss", 0.0), new_state

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, _ = opt.update(grads, opt.init(params), params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_params)]))
    value_grads = [jnp.abs(g).max() for path, g in jax.tree_util.tree_leaves_with_path(grads)
                   if "'value'" in jax.tree_util.keystr(path)]
    return loss, finite, jnp.max(jnp.stack(value_grads))

  loss, finite, value_grad = step(variables, jax.random.PRNGKey(0))
  return float(loss), bool(finite), float(value_grad)


ONE_LAYER = dict(BASE, num_layers=1)
# Per-family train steps run without dropout: its random masks are a quarter of the
# compiled program, and dropout layers are the same for every family. Training mode
# (each family's deterministic=False path) is on in all of them; dropout itself is on in
# the dual encoder's steps (the classifier's encoder) and in dense's causal LM step.
_KIND_CONFIGS = {
    "classifier": dict(ONE_LAYER, dropout_rate=0.0),
    "dual_encoder": dict(ONE_LAYER, kind="dual_encoder", pool="mean"),
    "causal_lm": dict(ONE_LAYER, kind="causal_lm", positional="rotary", mem_len=8,
                      dropout_rate=0.0),
}
_ARGS = {"one": (TOKENS,), "two": (TOKENS, TOKENS2)}


def _assert_trains(model, kind, args_key, targets):
  loss, finite, value_grad = _train_step(model, kind, args_key, targets)
  assert np.isfinite(loss) and finite
  assert value_grad > 0


# Every family trains inside a model once: a family that supports causal attention in the
# causal LM (test_causal_lm_train_step), the bidirectional-only ones here, and dense in
# both. Around the family, a kind's model is one code path for every family (the shared
# self-attention: projections, masking); a family's own bidirectional kernel is checked
# in tests/attention (test_contract: finite gradients that reach the values, padding,
# bfloat16; test_exact and test_approximate: outputs against the reference or the
# paper's formula).
@pytest.mark.parametrize("name", [n for n in ea.names()
                                  if n == "dense" or not ea.supports_causal(n)])
def test_classifier_train_step(name):
  model = models.build(dict(_KIND_CONFIGS["classifier"], attention=name,
                            attention_kwargs=_options(name)))
  _assert_trains(model, "classifier", "one", LABELS)


# The encoder (and so every family inside it) is the classifier's; what the dual encoder
# adds is two calls of one encoder and the [u, v, u*v, u-v] head: checked with dense, with
# routing (its mutable centroids are updated by both calls) and with sinkhorn (parameters
# of its own, shared by both calls). Every family's encoder is covered by the classifier.
@pytest.mark.parametrize("name", ["dense", "routing", "sinkhorn"])
def test_dual_encoder_train_step(name):
  model = models.build(dict(_KIND_CONFIGS["dual_encoder"], attention=name,
                            attention_kwargs=_options(name)))
  _assert_trains(model, "dual_encoder", "two", LABELS)


@pytest.mark.parametrize("name", [n for n in ea.names() if ea.supports_causal(n)])
def test_causal_lm_train_step(name):
  model = models.build(dict(_KIND_CONFIGS["causal_lm"], attention=name,
                            attention_kwargs=_options(name),
                            dropout_rate=0.1 if name == "dense" else 0.0))
  _assert_trains(model, "causal_lm", "one", None)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_pooling_ignores_padding(pool):
  """Appending padding changes no logit (the mask comes from token id 0)."""
  model = models.build(dict(BASE, pool=pool, dropout_rate=0.0))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), TOKENS)
  apply = jax.jit(model.apply)
  logits, _ = apply(variables, TOKENS)
  padded = jnp.pad(TOKENS, ((0, 0), (0, 8)))
  np.testing.assert_allclose(apply(variables, padded)[0], logits, atol=1e-5)


def test_mean_pool_weights_only_real_tokens():
  x = jnp.array([[[1.0], [3.0], [100.0]]])
  assert float(models.pool(x, jnp.array([[True, True, False]]), "mean")[0, 0]) == 2.0


def test_aux_holds_named_intermediates():
  model = models.build(dict(BASE, num_layers=3))
  # Shapes only: traced, not compiled.
  logits, aux = jax.eval_shape(lambda: model.apply(model.init(jax.random.PRNGKey(0), TOKENS),
                                                   TOKENS))
  assert logits.shape == (2, 3)
  assert aux["hidden"].shape == (3, 2, 25, 16)       # layers, batch, CLS + tokens, width
  assert aux["attention"].shape == (3, 2, 25, 16)
  assert aux["embedded"].shape == aux["final"].shape == (2, 25, 16)
  assert aux["pooled"].shape == (2, 16) and aux["mask"].shape == (2, 25)


def test_every_parameter_has_logical_axes():
  for kind, args in (("classifier", (TOKENS,)), ("dual_encoder", (TOKENS, TOKENS2)),
                     ("causal_lm", (TOKENS,))):
    model = models.build(dict(BASE, kind=kind, reversible=kind == "classifier"))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args))
    leaves = jax.tree.leaves(variables["params"],
                             is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    bare = [x for x in leaves if not isinstance(x, nn.LogicallyPartitioned)]
    assert not bare, f"{kind}: {len(bare)} parameters without logical axis names"


def test_whole_model_and_block_under_nnx():
  model = models.build(BASE)

  @nnx.jit  # one compiled program instead of one per operation
  def init_and_call(wrapped, tokens):
    nnx.bridge.lazy_init(wrapped, tokens)
    return wrapped(tokens)

  with nnx.use_eager_sharding(False):
    wrapped = nnx.bridge.ToNNX(model, rngs=nnx.Rngs(0))
    logits, _ = init_and_call(wrapped, TOKENS)
  assert logits.shape == (2, 3)
  # The initialised variables live in the NNX module after the call.
  assert len(jax.tree.leaves(nnx.state(wrapped, nnx.Param))) > 0


@pytest.mark.parametrize("overrides,error,match", [
    (dict(hidden_size=3), ValueError, "unknown config key.*model.hidden_size"),
    (dict(num_layers="two"), TypeError, "model.num_layers='two' must be an int"),
    (dict(kind="seq2seq"), ValueError, "model.kind='seq2seq'"),
    (dict(num_heads=3), ValueError, "qkv_dim=16 is not divisible by model.num_heads=3"),
    (dict(reversible=True, emb_dim=15, qkv_dim=15, num_heads=3), ValueError,
     "emb_dim=15 must be even"),
    (dict(ff_chunk_size=0), ValueError, "ff_chunk_size=0"),
    (dict(attention="flash"), ValueError, "unknown attention family 'flash'"),
    (dict(attention_kwargs={"window": 0}, attention="local"), ValueError, "window=0"),
    (dict(pool="max"), ValueError, "model.pool='max'"),
    (dict(remat="some"), ValueError, "remat='some'"),
    (dict(mem_len=4), ValueError, "causal_lm"),
    (dict(classifier_dim=-3), ValueError, "classifier_dim=-3 must be a positive integer"),
])
def test_bad_config(overrides, error, match):
  with pytest.raises(error, match=match):
    models.build(dict(BASE, **overrides))


def test_too_long_input():
  model = models.build(BASE)
  with pytest.raises(ValueError, match="exceeds model.max_len=40"):
    model.init(jax.random.PRNGKey(0), jnp.ones((1, 45), jnp.int32))

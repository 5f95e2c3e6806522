"""SelfAttention: parameter trees, weight transfer from dense, masking, errors, NNX."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import effx.attention as ea
from support import SMALL, padding_mask

X = jax.random.normal(jax.random.PRNGKey(0), (2, 37, 24))
MASK = padding_mask(2, 37)


def _layer(name, **kwargs):
  return ea.SelfAttention(num_heads=3, qkv_features=24, attention=name,
                          attention_kwargs=SMALL.get(name), **kwargs)


def _param_shapes(layer):
  """Parameter shapes without running anything."""
  variables = jax.eval_shape(layer.init, jax.random.PRNGKey(0), X)
  return jax.tree.map(jnp.shape, nn.unbox(variables["params"]))


DENSE_PARAMS = _param_shapes(_layer("dense"))
WITH_PARAMS = {"sinkhorn", "linformer", "synthesizer", "adaptive_span"}


@pytest.mark.parametrize("name", ea.names())
def test_parameter_tree(name):
  params = _param_shapes(_layer(name))
  if name in WITH_PARAMS:
    assert set(params) == set(DENSE_PARAMS) | {"mixer"}
    params = {k: v for k, v in params.items() if k != "mixer"}
  assert params == DENSE_PARAMS


def test_dense_weights_load_into_a_parameter_free_family():
  """Dense-trained weights drive blockwise (exact) to the same outputs, and local to the
  same outputs when the window covers the whole sequence."""
  variables = _layer("dense").init(jax.random.PRNGKey(1), X)
  want = _layer("dense").apply(variables, X, MASK)
  np.testing.assert_allclose(_layer("blockwise").apply(variables, X, MASK), want, atol=1e-5)
  wide = ea.SelfAttention(num_heads=3, qkv_features=24, attention="local",
                          attention_kwargs={"window": 64})
  np.testing.assert_allclose(wide.apply(variables, X, MASK), want, atol=1e-5)


def test_padded_inputs_do_not_change_real_outputs():
  layer = _layer("local")
  variables = layer.init(jax.random.PRNGKey(0), X)
  noisy = jnp.where(MASK[..., None], X, 100.0)
  np.testing.assert_allclose(layer.apply(variables, noisy, MASK)[MASK],
                             layer.apply(variables, X, MASK)[MASK], atol=1e-5)


def test_dropout_only_in_training():
  layer = _layer("dense", dropout_rate=0.5)
  variables = layer.init(jax.random.PRNGKey(0), X)
  eval_out = layer.apply(variables, X)
  np.testing.assert_array_equal(eval_out, layer.apply(variables, X))
  train_out = layer.apply(variables, X, deterministic=False,
                          rngs={"dropout": jax.random.PRNGKey(3)})
  assert not np.allclose(train_out, eval_out)


def test_bfloat16_compute():
  layer = _layer("performer", dtype=jnp.bfloat16)
  variables = layer.init(jax.random.PRNGKey(0), X)
  out = layer.apply(variables, X, MASK)
  assert out.dtype == jnp.bfloat16
  ref = _layer("performer").apply(variables, X, MASK)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.1)


def test_logical_axis_annotations():
  variables = _layer("dense").init(jax.random.PRNGKey(0), X)
  specs = nn.get_partition_spec(variables)["params"]
  assert tuple(specs["query"]["kernel"]) == ("embed", "heads", "kv")
  assert tuple(specs["out"]["kernel"]) == ("heads", "kv", "embed")


def test_inside_an_nnx_model():
  """Linen SelfAttention wrapped for Flax NNX with flax.nnx.bridge. Outside a mesh, NNX
  must be told not to shard the annotated variables eagerly."""
  with nnx.use_eager_sharding(False):
    layer = nnx.bridge.ToNNX(_layer("local"), rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(layer, X)
    out = layer(X)
  assert out.shape == X.shape
  assert len(jax.tree.leaves(nnx.state(layer, nnx.Param))) == 8


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=5, qkv_features=24), "not divisible by num_heads"),
    (dict(num_heads=3, qkv_features=24, attention="flash9"), "registered families: dense"),
    (dict(num_heads=3, qkv_features=24, attention="local",
          attention_kwargs={"window": 0}), "window=0"),
    (dict(num_heads=3, qkv_features=24, attention="local",
          attention_kwargs={"widow": 4}), "no option.*'widow'.*window"),
    (dict(num_heads=3, qkv_features=24, attention="bigbird", causal=True),
     "does not support causal"),
    (dict(num_heads=3, qkv_features=24, dropout_rate=1.5), "dropout_rate"),
])
def test_bad_configuration_fails_on_construction(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    ea.SelfAttention(**kwargs)


def test_bad_input_shape():
  with pytest.raises(ValueError, match=r"x must be \[batch, length, features\]"):
    _layer("dense").init(jax.random.PRNGKey(0), X[0])

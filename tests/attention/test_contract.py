"""The call contract every attention family keeps (issue: attention zoo, "what must hold")."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effx.attention as ea
from support import SMALL, cases, padding_mask, qkv

BASE_SHAPE = qkv()[0].shape


def Bound(name, causal=False, q=None, mask=None, **override):  # noqa: N802 (reads as a class)
  """The family ``name`` with initialised variables, shared by every test that asks for
  the same family and options (and head count and width, which routing's centroids
  depend on); no family's variables depend on batch or length."""
  del mask
  q = qkv()[0] if q is None else q
  return _bound(name, causal, tuple(q.shape[2:]), tuple(sorted(override.items())))


@functools.lru_cache(maxsize=None)
def _bound(name, causal, heads_dim, override):
  return _Bound(name, causal, heads_dim, **dict(override))


class _Bound:
  """A family module with initialised variables, callable like a pure function.

  Float32 inputs of the shared shape ``[2, 37, 3, 8]`` with a mask go through one
  compiled program that returns the output and the q, k, v gradients of
  ``sum(out ** 2)`` together; other shapes, dtypes, RNG streams and modes through a
  jitted ``apply``. Families without variables skip initialisation (``{}``)."""

  def __init__(self, name, causal, heads_dim, **override):
    self.module = ea.make(name, causal=causal, **{**SMALL.get(name, {}), **override})
    q = jnp.zeros((2, 37, *heads_dim)) + jax.random.normal(jax.random.PRNGKey(3),
                                                           (2, 37, *heads_dim))
    mask = padding_mask()
    key = jax.random.PRNGKey(42)
    if jax.tree.leaves(jax.eval_shape(self.module.init, key, q, q, q, mask=mask)):
      self.variables = jax.jit(self.module.init)(key, q, q, q, mask=mask)
    else:
      self.variables = {}
    self._apply = jax.jit(self.module.apply, static_argnames=("deterministic",))

    def out_and_grads(variables, q, k, v, mask):
      out, vjp = jax.vjp(lambda *a: self.module.apply(variables, *a, mask=mask), q, k, v)
      return out, vjp(2.0 * out)  # d sum(out ** 2) / d(q, k, v)

    self._out_and_grads = jax.jit(out_and_grads)

  def _shared(self, q, mask, deterministic, rng):
    return (q.shape == BASE_SHAPE and q.dtype == jnp.float32 and mask is not None
            and deterministic and rng is None)

  def grad(self, q, k, v, mask=None):
    """Gradients of ``sum(out ** 2)`` with respect to q, k, v."""
    assert self._shared(q, mask, True, None)
    return self._out_and_grads(self.variables, q, k, v, mask)[1]

  def __call__(self, q, k, v, mask=None, deterministic=True, rng=None):
    if self._shared(q, mask, deterministic, rng):
      return self._out_and_grads(self.variables, q, k, v, mask)[0]
    rngs = None if rng is None else {"dropout": rng}
    return self._apply(self.variables, q, k, v, mask=mask, deterministic=deterministic,
                       rngs=rngs)


# Families whose bucketing looks at every token: later tokens may change which earlier
# keys a query sees, but a later token's value never reaches an earlier output.
CONTENT_ROUTED = {"lsh", "routing"}


@pytest.mark.parametrize("name,causal", cases())
def test_shape_dtype_jit_grad(name, causal):
  q, k, v = qkv()
  mask = padding_mask()
  fam = Bound(name, causal, q=q, mask=mask)
  out = fam(q, k, v, mask)
  chex.assert_shape(out, q.shape)
  chex.assert_type(out, jnp.float32)
  chex.assert_tree_all_finite(out)
  grads = fam.grad(q, k, v, mask)
  chex.assert_tree_all_finite(grads)
  assert float(jnp.abs(grads[2]).sum()) > 0  # values always matter


@pytest.mark.parametrize("name,causal", cases())
def test_bfloat16(name, causal):
  """bf16 inputs give bf16 outputs within 3e-2 (absolute, unit-scale data) of the same
  family run in float32 on the same (bf16-rounded) inputs."""
  q, k, v = qkv(dtype=jnp.bfloat16)
  mask = padding_mask()
  fam = Bound(name, causal, q=q.astype(jnp.float32), mask=mask)
  out16 = fam(q, k, v, mask)
  out32 = fam(*(x.astype(jnp.float32) for x in (q, k, v)), mask)
  chex.assert_type(out16, jnp.bfloat16)
  np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(out32), atol=3e-2)


@pytest.mark.parametrize("name,causal", cases())
def test_padding_is_ignored_and_zeroed(name, causal):
  q, k, v = qkv()
  mask = padding_mask()
  fam = Bound(name, causal, q=q, mask=mask)
  out = fam(q, k, v, mask)
  noise = qkv(seed=7)
  pad = ~mask[:, :, None, None]
  changed = fam(*(jnp.where(pad, 5.0 * n, x) for x, n in zip((q, k, v), noise)), mask)
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(changed)[real], np.asarray(out)[real], atol=1e-5)
  assert np.all(np.asarray(out)[~real] == 0.0)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", [n for n, c in cases() if c])
def test_causality(name, padded):
  """Changing positions >= t changes no output before t, with and without padding.
  Content-routed families: only values are changed (their routing may legitimately move
  earlier tokens)."""
  q, k, v = qkv()
  mask = padding_mask() if padded else jnp.ones(q.shape[:2], bool)
  fam = Bound(name, True, q=q, mask=mask)
  out = fam(q, k, v, mask)
  length = q.shape[1]
  for t in (1, 10, length // 3, length - 1):
    future = (jnp.arange(length) >= t)[None, :, None, None]
    noise = qkv(seed=11 + t)
    new = [jnp.where(future, n, x) for x, n in zip((q, k, v), noise)]
    if name in CONTENT_ROUTED:
      new[:2] = [q, k]
    changed = fam(*new, mask)
    np.testing.assert_allclose(np.asarray(changed[:, :t]), np.asarray(out[:, :t]), atol=1e-5,
                               err_msg=f"{name}: output before {t} depends on the future")


# Longformer's negative global positions count from the end of the padded input, an
# option that depends on the padded length by definition; the rest of SMALL is kept.
PADDING_OPTIONS = {"longformer": dict(global_tokens=(0, 9))}


@pytest.mark.parametrize("name,causal", cases())
def test_padding_length_changes_no_real_output(name, causal):
  """The same real tokens followed by 0, 16 or 27 padding positions (random content):
  equal real outputs (relative 1e-5), in evaluation. Row 0 has 21 real tokens, row 1 has
  14 with padding in the middle too (positions 3 and 4). (Length 37 is the shape the
  other tests compile.)"""
  q, k, v = qkv(length=48)
  mask = np.arange(48)[None, :] < np.array([[21], [14]])
  mask[1, 3:5] = False
  mask = jnp.asarray(mask)
  fam = Bound(name, causal, q=q, mask=mask, **PADDING_OPTIONS.get(name, {}))
  outs = [np.asarray(fam(q[:, :n], k[:, :n], v[:, :n], mask[:, :n])) for n in (21, 37, 48)]
  real = np.asarray(mask[:, :21])
  scale = np.abs(outs[0][real]).max()
  for n, out in zip((37, 48), outs[1:]):
    change = np.abs(out[:, :21][real] - outs[0][real]).max() / scale
    assert change <= 1e-5, f"{name}: padding to {n} changed real outputs by {change:.2e}"


@pytest.mark.parametrize("name,causal", cases())
def test_large_magnitudes(name, causal):
  """Queries and keys 10x larger than unit scale: finite outputs and gradients."""
  q, k, v = qkv()
  q, k = 10.0 * q, 10.0 * k
  mask = padding_mask()
  fam = Bound(name, causal, q=q, mask=mask)
  chex.assert_tree_all_finite(fam(q, k, v, mask))
  chex.assert_tree_all_finite(fam.grad(q, k, v, mask))


@pytest.mark.parametrize("name,causal", cases())
def test_fully_padded_row(name, causal):
  """A batch entry with no real token: zeros, and no NaN in outputs or gradients."""
  q, k, v = qkv()
  mask = padding_mask().at[1].set(False)
  fam = Bound(name, causal, q=q, mask=mask)
  out = fam(q, k, v, mask)
  assert np.all(np.asarray(out[1]) == 0.0)
  chex.assert_tree_all_finite(out)
  chex.assert_tree_all_finite(fam.grad(q, k, v, mask))


# Each family's use of RNG streams (family_key, make_rng) does not depend on causality:
# checked once per family, non-causal (a program compiled for the RNG streams alone).
@pytest.mark.parametrize("name,causal", [(n, c) for n, c in cases() if not c])
def test_eval_is_a_pure_function(name, causal):
  """At evaluation the output depends on variables and inputs only: the RNG streams a
  training step would provide change nothing, bitwise."""
  q, k, v = qkv()
  mask = padding_mask()
  fam = Bound(name, causal, q=q, mask=mask)
  out = fam(q, k, v, mask, rng=jax.random.PRNGKey(1))
  np.testing.assert_array_equal(fam(q, k, v, mask, rng=jax.random.PRNGKey(2)), out)
  np.testing.assert_allclose(fam(q, k, v, mask), out, atol=1e-6)


@pytest.mark.parametrize("name,option", [("lsh", "redraw"), ("performer", "redraw")])
def test_redraw_in_training_only(name, option):
  """With redraw, training calls draw fresh randomness from the "dropout" stream;
  evaluation keeps the fixed per-layer draw."""
  q, k, v = qkv()
  fam = Bound(name, **{option: True})
  a = fam(q, k, v, deterministic=False, rng=jax.random.PRNGKey(1))
  b = fam(q, k, v, deterministic=False, rng=jax.random.PRNGKey(2))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(fam(q, k, v, deterministic=False, rng=jax.random.PRNGKey(1)), a)
  fixed = Bound(name, **{option: False})
  np.testing.assert_array_equal(
      fixed(q, k, v, deterministic=False, rng=jax.random.PRNGKey(1)), fixed(q, k, v))


def test_routing_centroids_move_only_in_training():
  q, k, v = qkv()
  fam = Bound("routing", q=q)
  before = fam.variables["state"]["centroids"]
  apply = jax.jit(fam.module.apply, static_argnames=("deterministic", "mutable"))
  _, state = apply(fam.variables, q, k, v, deterministic=True, mutable=("state",))
  np.testing.assert_array_equal(state["state"]["centroids"], before)
  _, state = apply(fam.variables, q, k, v, deterministic=False, mutable=("state",))
  after = state["state"]["centroids"]
  assert 0 < float(jnp.abs(after - before).max()) < 0.01  # EMA with decay 0.999
  np.testing.assert_allclose(np.linalg.norm(after, axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ea.names())
def test_other_head_dims(name):
  """Head dims other than 8 and a single head work too."""
  q, k, v = qkv(heads=1, dim=16, length=20)
  fam = Bound(name, q=q, **({"dilation": 2} if name == "dilated" else {}))
  chex.assert_shape(fam(q, k, v), q.shape)

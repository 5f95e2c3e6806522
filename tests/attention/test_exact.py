"""Exact families equal the dense reference restricted to their allow-pattern, in
outputs and input gradients (float32, relative error <= 1e-5)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effx.attention as ea
from support import padding_mask
from effx.attention import lsh as lsh_lib

RTOL = 1e-5

# (family, options): several per family, chosen to hit block edges, windows wider than
# the sequence, and block sizes that do not divide the lengths below.
STATIC = [
    ("dense", {}),
    ("blockwise", dict(q_chunk=8, k_chunk=16)),
    ("blockwise", dict(q_chunk=5, k_chunk=7)),
    ("local", dict(window=1)),
    ("local", dict(window=4)),
    ("local", dict(window=80)),
    ("dilated", dict(window=2, dilation=2)),
    ("dilated", dict(window=1, dilation=(1, 2, 3))),
    ("sparse", dict(pattern="strided", stride=1)),
    ("sparse", dict(pattern="strided", stride=6)),
    ("sparse", dict(pattern="fixed", stride=4, summary=1)),
    ("sparse", dict(pattern="fixed", stride=5, summary=2)),
    ("longformer", dict(window=3, global_tokens=(0, 9, -1))),
    ("longformer", dict(window=2, global_tokens=())),
    ("bigbird", dict(block_size=4, num_random_blocks=2, num_global_blocks=2)),
    ("bigbird", dict(block_size=5, num_random_blocks=1, num_global_blocks=1)),
    ("bigbird", dict(block_size=3, num_random_blocks=0, num_global_blocks=0)),
]
CONTENT = [
    ("lsh", dict(n_hashes=1, bucket_size=4)),
    ("lsh", dict(n_hashes=3, bucket_size=8)),
    ("routing", dict(num_clusters=4)),
    ("routing", dict(num_clusters=3, window=5)),
]
# (batch, length, heads, head_dim, head_dim_v): every case runs on the first shape; the
# first case of each family also on the second (value width != key width).
SHAPES = [(2, 37, 3, 8, 8), (1, 24, 3, 16, 5)]


def _with_shapes(cases):
  seen = set()
  out = []
  for name, options in cases:
    out.append((name, options, SHAPES[0]))
    if name not in seen:
      seen.add(name)
      out.append((name, options, SHAPES[1]))
  return out


def _id(case):
  name, options, shape = case
  return f"{name}-{'-'.join(f'{k}={v}' for k, v in options.items())}-{'x'.join(map(str, shape))}"


def _inputs(shape, seed=0):
  b, length, h, d, dv = shape
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (b, length, h, d))
  k = jax.random.normal(keys[1], (b, length, h, d))
  v = jax.random.normal(keys[2], (b, length, h, dv))
  w = jax.random.normal(keys[3], (b, length, h, dv))  # cotangent for the gradient check
  return q, k, v, w, padding_mask(b, length)


def _assert_close(name, got, want):
  got, want = np.asarray(got), np.asarray(want)
  scale = max(np.abs(want).max(), 1e-6)
  err = np.abs(got - want).max() / scale
  assert err <= RTOL, f"{name}: relative error {err:.2e} > {RTOL}"


def _out_and_grads(fn, args, w):
  """``fn(*args)`` and the gradients of ``<fn(*args), w>``, in one program."""
  out, vjp = jax.vjp(fn, *args)
  return out, vjp(w)


@functools.partial(jax.jit, static_argnames=("normalise_keys",))
def _reference_out_and_grads(q, k, v, w, mask, pattern, normalise_keys=False):
  """Compiled once per shape and shared by every case (the pattern is an argument)."""
  def ref(q, k, v):
    keys = lsh_lib._unit(q) if normalise_keys else k
    return ea.reference(q, keys, v, mask=mask, pattern=pattern)
  return _out_and_grads(ref, (q, k, v), w)


def _causal_settings(name):
  return (False, True) if ea.supports_causal(name) else (False,)


@pytest.mark.parametrize("name,options,shape", _with_shapes(STATIC),
                         ids=[_id(c) for c in _with_shapes(STATIC)])
def test_static_pattern_family_equals_reference(name, options, shape):
  q, k, v, w, mask = _inputs(shape)
  h, length = shape[2], shape[1]
  for causal in _causal_settings(name):
    module = ea.make(name, causal=causal, **options)
    allowed = jnp.asarray(module.allow_matrix(length, h))
    family = jax.jit(lambda q, k, v: _out_and_grads(
        lambda *a: module.apply({}, *a, mask=mask), (q, k, v), w))
    out, grad = family(q, k, v)
    ref, ref_grad = _reference_out_and_grads(q, k, v, w, mask, allowed)
    label = f"{name}{options} causal={causal}"
    _assert_close(label + " out", out, ref)
    for which, g, r in zip("qkv", grad, ref_grad):
      _assert_close(f"{label} d{which}", g, r)


@pytest.mark.parametrize("name,options,shape", _with_shapes(CONTENT),
                         ids=[_id(c) for c in _with_shapes(CONTENT)])
def test_content_pattern_family_equals_reference(name, options, shape):
  """LSH and routing equal the reference over the pattern their hashes / clusters induce
  (LSH: keys are the unit-normalised queries; its k input is unused)."""
  q, k, v, w, mask = _inputs(shape)
  for causal in (False, True):
    module = ea.make(name, causal=causal, **options)
    variables = jax.jit(module.init)(jax.random.PRNGKey(1), q, k, v, mask=mask)
    allowed = jax.jit(functools.partial(module.apply, method="allow_matrix"))(
        variables, q, k, mask=mask)
    argnums = (0, 2) if name == "lsh" else (0, 1, 2)  # LSH ignores k
    # The pattern is held fixed: gradients are those of attention over fixed buckets.
    family = jax.jit(lambda q, k, v: _out_and_grads(
        lambda *a: module.apply(variables, *a, mask=mask), (q, k, v), w))
    out, grad = family(q, k, v)
    ref, ref_grad = _reference_out_and_grads(q, k, v, w, mask, allowed,
                                             normalise_keys=name == "lsh")
    label = f"{name}{options} causal={causal}"
    _assert_close(label + " out", out, ref)
    for which in argnums:
      _assert_close(f"{label} d{'qkv'[which]}", grad[which], ref_grad[which])


def test_blockwise_matches_dense_at_a_longer_length():
  """A length with several chunks in both directions and a ragged last chunk."""
  q, k, v, w, mask = _inputs((1, 300, 2, 16, 16))
  for causal in (False, True):
    out = ea.blockwise_attention(q, k, v, mask=mask, causal=causal, q_chunk=64, k_chunk=96)
    _assert_close("blockwise", out, ea.reference(q, k, v, mask=mask, causal=causal))

"""Exact families equal the dense reference restricted to their allow-pattern, in
outputs and input gradients (float32, relative error <= 1e-5)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effx.attention as ea
from support import padding_mask

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
    ("lsh", dict(n_hashes=2, bucket_size=6, n_buckets=4)),
    ("routing", dict(num_clusters=4, window=10)),
    ("routing", dict(num_clusters=3, window=5)),
    ("routing", dict(window=8)),
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
    keys = q / jnp.linalg.norm(q, axis=-1, keepdims=True) if normalise_keys else k
    return ea.reference(q, keys, v, mask=mask, pattern=pattern)
  return _out_and_grads(ref, (q, k, v), w)


def _static_pattern(name, module, mask, heads):
  """``[batch, heads, length, length]``: BigBird plans its blocks over each example's
  extent (last real position + 1), so a padded example has the pattern of an unpadded
  input of that length; the other static families' patterns do not depend on it."""
  length = mask.shape[1]
  if name != "bigbird":
    return np.broadcast_to(module.allow_matrix(length, heads), (mask.shape[0], heads,
                                                                 length, length))
  out = np.zeros((mask.shape[0], heads, length, length), bool)
  for b, row in enumerate(np.asarray(mask)):
    extent = np.flatnonzero(row)[-1] + 1
    out[b, :, :extent, :extent] = module.allow_matrix(int(extent), heads)
  return out


def _causal_settings(name):
  return (False, True) if ea.supports_causal(name) else (False,)


@pytest.mark.parametrize("name,options,shape", _with_shapes(STATIC),
                         ids=[_id(c) for c in _with_shapes(STATIC)])
def test_static_pattern_family_equals_reference(name, options, shape):
  q, k, v, w, mask = _inputs(shape)
  h = shape[2]
  for causal in _causal_settings(name):
    module = ea.make(name, causal=causal, **options)
    allowed = jnp.asarray(_static_pattern(name, module, mask, h))
    family = jax.jit(lambda q, k, v: _out_and_grads(
        lambda *a: module.apply({}, *a, mask=mask), (q, k, v), w))
    out, grad = family(q, k, v)
    ref, ref_grad = _reference_out_and_grads(q, k, v, w, mask, allowed)
    label = f"{name}{options} causal={causal}"
    _assert_close(label + " out", out, ref)
    for which, g, r in zip("qkv", grad, ref_grad):
      _assert_close(f"{label} d{which}", g, r)


def _lsh_pattern(q, mask, rotations, bucket_size, n_buckets, causal):
  """Reformer's pattern from the paper's recipe, in NumPy: per round, angular LSH
  ``argmax([xR; -xR])`` over ``n_buckets`` buckets (default twice the chunks of the real
  tokens), the real tokens stably sorted by bucket, cut into chunks of ``bucket_size``;
  each chunk sees itself and the chunk before; not oneself unless alone."""
  q, mask, rotations = np.asarray(q, np.float64), np.asarray(mask), np.asarray(rotations)
  b, length, heads, _ = q.shape
  out = np.zeros((b, heads, length, length), bool)
  for bi in range(b):
    real = np.flatnonzero(mask[bi])
    half = n_buckets // 2 if n_buckets else -(-len(real) // bucket_size)
    for h in range(heads):
      seen = np.zeros((length, length), bool)
      for r in range(rotations.shape[2]):
        proj = q[bi, real, h] @ rotations[h, :, r, :half]
        bucket = np.argmax(np.concatenate([proj, -proj], axis=1), axis=1)
        rank = np.empty(len(real), int)
        rank[np.lexsort((real, bucket))] = np.arange(len(real))
        chunk = rank // bucket_size
        near = (chunk[:, None] == chunk[None, :]) | (chunk[:, None] - 1 == chunk[None, :])
        seen[np.ix_(real, real)] |= near
      np.fill_diagonal(seen, False)
      if causal:
        seen &= np.tri(length, dtype=bool)
      alone = ~seen.any(axis=1)
      seen[alone, alone] = True
      out[bi, h] = seen
  return out


def _routing_pattern(q, k, mask, centroids, window, causal):
  """The Routing Transformer's pattern in NumPy: each centroid takes its ``window``
  most similar real (unit-normalised) queries and keys; a query sees the keys of every
  cluster it is in, and itself."""
  q, k, mask, centroids = (np.asarray(x, np.float64) for x in (q, k, mask, centroids))
  b, length, heads, _ = q.shape
  out = np.zeros((b, heads, length, length), bool)
  for bi in range(b):
    real = np.flatnonzero(mask[bi])
    w = min(window, len(real))
    for h in range(heads):
      def members(x):
        x = x[bi, real, h] / np.linalg.norm(x[bi, real, h], axis=-1, keepdims=True)
        sims = centroids[h] @ x.T                                   # [clusters, real]
        picked = np.zeros((len(centroids[h]), length), bool)
        for c, row in enumerate(sims):
          picked[c, real[np.argsort(-row, kind="stable")[:w]]] = True
        return picked
      seen = (members(q).T.astype(int) @ members(k).astype(int)) > 0
      seen |= np.eye(length, dtype=bool)
      seen &= mask[bi].astype(bool)[None, :]
      if causal:
        seen &= np.tri(length, dtype=bool)
      out[bi, h] = seen
  return out


@functools.lru_cache(maxsize=None)
def _content_variables(name, options, shape):
  """The family's variables (routing's centroids; LSH has none), drawn once per options and
  shape and shared by both causal settings and the pattern test (causality adds none)."""
  q, k, v, _, mask = _inputs(shape)
  module = ea.make(name, **dict(options))
  key = jax.random.PRNGKey(1)
  if not jax.tree.leaves(jax.eval_shape(module.init, key, q, k, v, mask=mask)):
    return {}
  return jax.jit(module.init)(key, q, k, v, mask=mask)


@pytest.mark.parametrize("name,options,shape", _with_shapes(CONTENT),
                         ids=[_id(c) for c in _with_shapes(CONTENT)])
def test_content_pattern_family_equals_reference(name, options, shape):
  """LSH and routing equal the reference over the pattern that an independent NumPy
  re-implementation of their hashing / clustering gives for the module's own random
  rotations / centroids (LSH: keys are the unit-normalised queries; its k input is
  unused)."""
  q, k, v, w, mask = _inputs(shape)
  for causal in (False, True):
    module = ea.make(name, causal=causal, **options)
    variables = _content_variables(name, tuple(options.items()), shape)
    if name == "lsh":
      rotations = module.apply(variables, q, method=lambda m, q: m.rotations(q))
      allowed = _lsh_pattern(q, mask, rotations, options["bucket_size"],
                             options.get("n_buckets"), causal)
    else:
      allowed = _routing_pattern(q, k, mask, variables["state"]["centroids"],
                                 options.get("window", 128), causal)
    argnums = (0, 2) if name == "lsh" else (0, 1, 2)  # LSH ignores k
    # The pattern is held fixed: gradients are those of attention over fixed buckets.
    family = jax.jit(lambda q, k, v: _out_and_grads(
        lambda *a: module.apply(variables, *a, mask=mask), (q, k, v), w))
    out, grad = family(q, k, v)
    ref, ref_grad = _reference_out_and_grads(q, k, v, w, mask, jnp.asarray(allowed),
                                             normalise_keys=name == "lsh")
    label = f"{name}{options} causal={causal}"
    _assert_close(label + " out", out, ref)
    for which in argnums:
      _assert_close(f"{label} d{'qkv'[which]}", grad[which], ref_grad[which])


@pytest.mark.slow  # lsh and routing (not fast-tier families) at every shape
def test_content_patterns_match_the_modules_own_drawing():
  """``ea.pattern`` (the modules' allow_matrix) draws the same pattern as the oracles."""
  q, k, v, _, mask = _inputs(SHAPES[0])
  for name, options in CONTENT:
    module = ea.make(name, **options)
    variables = _content_variables(name, tuple(options.items()), SHAPES[0])
    drawn = module.apply(variables, q, k, mask=mask, method="allow_matrix")
    if name == "lsh":
      rotations = module.apply(variables, q, method=lambda m, q: m.rotations(q))
      want = _lsh_pattern(q, mask, rotations, options["bucket_size"], options.get("n_buckets"),
                          False)
    else:
      want = _routing_pattern(q, k, mask, variables["state"]["centroids"],
                              options.get("window", 128), False)
    real = np.asarray(mask)[:, None, :, None] & np.asarray(mask)[:, None, None, :]
    np.testing.assert_array_equal(np.asarray(drawn) & real, want & real, err_msg=name)


def test_blockwise_matches_dense_at_a_longer_length():
  """A length with several chunks in both directions and a ragged last chunk."""
  q, k, v, w, mask = _inputs((1, 300, 2, 16, 16))
  for causal in (False, True):
    out, ref = jax.jit(lambda q, k, v: (  # noqa: B023 (called at once)
        ea.blockwise_attention(q, k, v, mask=mask, causal=causal, q_chunk=64, k_chunk=96),
        ea.reference(q, k, v, mask=mask, causal=causal)))(q, k, v)
    _assert_close("blockwise", out, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_dense_cudnn_equals_xla(causal):
  """cuDNN's fused kernel (GPU, bfloat16) computes dense attention: outputs and
  gradients within bfloat16 tolerance of the XLA path, padding and causality included;
  "auto" picks it there."""
  q, k, v, w, mask = (x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x
                      for x in _inputs((2, 256, 4, 64, 64)))

  def run(implementation):
    return jax.jit(lambda q, k, v: _out_and_grads(
        lambda *a: ea.dense_attention(*a, mask=mask, causal=causal,
                                      implementation=implementation), (q, k, v), w))(q, k, v)

  (out, grads), (ref, ref_grads) = run("cudnn"), run("xla")
  for got, want in zip((out, *grads), (ref, *ref_grads)):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.abs(got - want).max() <= 2e-2 * max(np.abs(want).max(), 1.0)
  np.testing.assert_array_equal(np.asarray(run("auto")[0], np.float32), np.asarray(out, np.float32))


@pytest.mark.slow  # four BigBird plans against the paper's rules; bigbird's equality test stays fast
@pytest.mark.parametrize("blocks,num_global,num_random", [(16, 2, 3), (9, 1, 2), (6, 3, 5),
                                                          (12, 0, 0)])
def test_bigbird_pattern_follows_the_papers_rules(blocks, num_global, num_random):
  """Checked on the allow-matrix, independently of how the plan is drawn: whole blocks;
  the first ceil(g/2) and last floor(g/2) blocks global (full rows and columns); every
  other row sees its window and exactly min(r, candidates) other blocks; over 64 heads
  the random blocks cover the candidates about uniformly."""
  bs, heads = 3, 64
  module = ea.make("bigbird", block_size=bs, num_random_blocks=num_random,
                   num_global_blocks=num_global)
  allowed = np.asarray(module.allow_matrix(blocks * bs, heads))
  grid = allowed[:, ::bs, ::bs]
  np.testing.assert_array_equal(allowed, grid.repeat(bs, 1).repeat(bs, 2))
  front = -(-num_global // 2)
  glob = sorted(set(range(front)) | set(range(blocks - (num_global - front), blocks)))
  picks = np.zeros(blocks)
  for h in range(heads):
    assert grid[h][glob].all() and grid[h][:, glob].all()
    for i in sorted(set(range(blocks)) - set(glob)):
      window = [j for j in (i - 1, i, i + 1) if 0 <= j < blocks]
      assert grid[h, i, window].all()
      others = sorted(set(np.flatnonzero(grid[h, i])) - set(window) - set(glob))
      candidates = blocks - len(set(window) | set(glob))
      assert len(others) == min(num_random, candidates), (h, i, others)
      picks[others] += 1
  if num_random and blocks >= 12:
    eligible = picks[[j for j in range(blocks) if j not in glob]]
    assert eligible.min() > 0.5 * eligible.mean()

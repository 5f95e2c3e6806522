"""Reformer LSH attention (Kitaev et al., 2020).

Shared-QK: keys are the unit-normalised queries, so the ``k`` argument is not used (the
``key`` projection stays in ``SelfAttention`` so every family has dense's parameter tree).
Per round, an angular LSH ``h(x) = argmax([xR; -xR])`` with a random rotation ``R``
buckets the tokens; tokens are sorted by (bucket, position) and cut into chunks of
``bucket_size``; each chunk attends to itself and the chunk before it (no wrap-around).
A token attends to itself only when it has no other target. Rounds are combined by their
log-sum-exp, with each logit lowered by ``log N_ij`` (the number of rounds in which ``i``
sees ``j``, the paper's duplicate correction), so the result is exactly the softmax over
the union of the rounds' neighbourhoods: the pattern ``lsh_allow_matrix`` returns. The
rounds' sorted sequences run through the block-sparse kernel (``kernel.attend``, chunks as
blocks, the duplicate correction as its logit bias), so memory is O(length * bucket).

Causal: the hashes depend on every token's query, so a later token can move an earlier
one between chunks (change *which* earlier keys it sees); a later token's value never
reaches an earlier output.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from effx.attention import kernel
from effx.attention.base import Family, check_positive, check_qkv, zero_padded_queries
from effx.attention.core import NEG, NotSelf, merge, pad_axis
from effx.attention.randomness import family_key
from effx.attention.registry import register


def num_buckets(length: int, bucket_size: int, n_buckets: int | None) -> int:
  """Buckets for ``length`` tokens. Default: twice the number of chunks, so an average
  bucket fills half a chunk."""
  return 2 * -(-length // bucket_size) if n_buckets is None else n_buckets


def draw_rotations(key: jax.Array, heads: int, head_dim: int, n_hashes: int,
                   n_buckets: int) -> jax.Array:
  """Random rotations ``[heads, head_dim, n_hashes, n_buckets // 2]``.

  Column ``c`` is drawn from ``fold_in(key, c)``, so the first columns are the same
  whatever ``n_buckets`` is: an example that uses fewer buckets (fewer real tokens)
  hashes with the same rotations however long its padded batch is.
  """
  def column(c):
    return jax.random.normal(jax.random.fold_in(key, c), (heads, head_dim, n_hashes),
                             jnp.float32)
  return jnp.moveaxis(jax.vmap(column)(jnp.arange(n_buckets // 2)), 0, -1)


def _unit(x):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def _chunk_of(q, valid, rotations, bucket_size, n_buckets):
  """Per round, the sort order and each token's chunk.

  Args:
    q: ``[b, lp, h, d]`` (length padded to whole chunks); valid: ``[b, lp]``.
    n_buckets: buckets per round, or None: ``num_buckets`` of each example's number of
      real tokens (``rotations`` must have enough columns for the longest).

  Returns:
    ``perm [b, h, r, lp]`` (sorted slot -> position) and ``chunk [b, h, r, lp]``
    (position -> chunk index in that round).
  """
  lp = q.shape[1]
  columns = rotations.shape[-1]
  if n_buckets is None:
    used = num_buckets(jnp.sum(valid, axis=1), bucket_size, None) // 2          # [b]
  else:
    used = jnp.full(q.shape[:1], n_buckets // 2)
  # Bucket ids: c where column c of xR is the largest of [xR; -xR], columns + c where its
  # negation is: the column of the largest |xR|, by its sign. The columns are scanned in
  # groups, so memory is O(length * group) although the default bucket count grows with
  # the length.
  unit = _unit(q)
  group = min(columns, 64)
  n_groups = -(-columns // group)
  rot_cols = pad_axis(rotations, group, axis=3)              # [h, d, r, n_groups * group]
  rot_cols = jnp.moveaxis(rot_cols.reshape(rot_cols.shape[:3] + (n_groups, group)), 3, 0)

  def scan_group(best, xs):
    top, idx = best
    start, rot_g = xs
    proj = jnp.einsum("blhd,hdrn->bhrln", unit, rot_g)          # [b, h, r, lp, group]
    col = start + jnp.arange(group)
    in_use = col < used[:, None, None, None, None]
    size = jnp.where(in_use, jnp.abs(proj), -1.0)
    local = jnp.argmax(size, axis=-1)
    value = jnp.take_along_axis(size, local[..., None], axis=-1)[..., 0]
    sign = jnp.take_along_axis(proj, local[..., None], axis=-1)[..., 0]
    bucket = jnp.where(sign >= 0, start + local, columns + start + local)
    better = value > top
    return (jnp.where(better, value, top), jnp.where(better, bucket, idx)), None

  shape = (q.shape[0], rotations.shape[0], rotations.shape[2], lp)
  init = (jnp.full(shape, -2.0, jnp.float32), jnp.zeros(shape, jnp.int32))
  (_, buckets), _ = jax.lax.scan(scan_group, init,
                                 (jnp.arange(n_groups, dtype=jnp.int32) * group, rot_cols))
  # Padding sorts after every real token, whatever its content.
  buckets = jnp.where(valid[:, None, None, :], buckets, columns * 2)
  perm = jnp.argsort(buckets * lp + jnp.arange(lp), axis=-1)
  chunk = jnp.argsort(perm, axis=-1) // bucket_size
  return perm, chunk


@dataclasses.dataclass(frozen=True)
class DuplicateCorrection:
  """Logit bias ``-log N_ij``: ``N_ij`` is the number of rounds in which query ``i`` sees
  key ``j`` (key's chunk is the query's or the one before), from each token's chunk in
  every round (``[..., rounds]`` integer infos)."""

  def __call__(self, q_chunks, k_chunks):
    diff = q_chunks - k_chunks
    count = jnp.sum(((diff == 0) | (diff == 1)).astype(jnp.float32), axis=-1)
    return -jnp.log(jnp.maximum(count, 1.0))


def lsh_attention(q: jax.Array, v: jax.Array, *, rotations: jax.Array,
                  mask: jax.Array | None = None, causal: bool = False,
                  bucket_size: int = 64, n_buckets: int | None = None) -> jax.Array:
  """Multi-round LSH attention with shared queries and keys.

  Args:
    q: ``[batch, length, heads, head_dim]`` queries, also used (unit-normalised) as keys.
    v: ``[batch, length, heads, head_dim_v]``.
    rotations: ``[heads, head_dim, n_hashes, n_buckets // 2]`` (``draw_rotations``).
    mask: optional ``[batch, length]`` padding mask (True = real token).
    causal: no attention to later positions.
    bucket_size: chunk length; the length is padded to whole chunks internally.
    n_buckets: buckets per round; None: ``num_buckets`` of each example's number of real
      tokens, using the first columns of ``rotations``.

  Returns:
    ``[batch, length, heads, head_dim_v]`` in ``q``'s dtype; zeros at padded queries.
  """
  mask = check_qkv("lsh", q, q, v, mask)
  b, length, h, d = q.shape
  dv = v.shape[-1]
  rounds = rotations.shape[2]
  valid = jnp.ones((b, length), bool) if mask is None else mask
  qp = pad_axis(q, bucket_size, axis=1)
  vp = pad_axis(v, bucket_size, axis=1)
  valid = pad_axis(valid, bucket_size, axis=1, value=False)
  lp = qp.shape[1]
  perm, chunk = _chunk_of(qp, valid, rotations, bucket_size, n_buckets)

  def sort(x):  # [b, lp, h, e] -> [b * r, lp, h, e], each (example, head, round) sorted
    x = jnp.take_along_axis(jnp.swapaxes(x, 1, 2)[:, :, None], perm[..., None], axis=3)
    return jnp.moveaxis(x, 1, 3).reshape(b * rounds, lp, h, x.shape[-1])

  def per_head(x):  # [b, h, r, lp, ...] -> [b * r, h, lp, ...]
    return jnp.swapaxes(x, 1, 2).reshape((b * rounds, h) + x.shape[3:])

  pos = per_head(perm)                                       # positions, sorted
  kvalid = per_head(jnp.take_along_axis(valid[:, None, None, :], perm, axis=3))
  # Each sorted token's chunk in every round, for the duplicate correction.
  chunk_by_pos = jnp.moveaxis(chunk, 2, -1)                 # [b, h, lp, r]
  info = per_head(jnp.take_along_axis(chunk_by_pos[:, :, None], perm[..., None], axis=3))
  # Sorted chunks: each sees itself and the chunk before it, through the block-sparse
  # kernel (blocks of one chunk, the band of one chunk back).
  layout = kernel.Layout.band(lp, bucket_size, bucket_size, 0)
  out, lse = kernel.attend(sort(qp), sort(_unit(qp)), sort(vp), layout, q_pos=pos, k_pos=pos,
                           k_valid=kvalid, causal=causal, rule=NotSelf(),
                           bias=DuplicateCorrection(), q_info=info, k_info=info,
                           scale=d ** -0.5)
  out = jnp.moveaxis(out.reshape(b, rounds, lp, h, dv), 3, 1)  # [b, h, r, lp, dv]
  lse = jnp.moveaxis(lse.reshape(b, rounds, lp, h), 3, 1)      # [b, h, r, lp]
  unsort = jnp.argsort(perm, axis=-1)
  out = jnp.take_along_axis(out, unsort[..., None], axis=3)
  lse = jnp.take_along_axis(lse, unsort, axis=3)
  out, lse = merge([(out[:, :, r], lse[:, :, r]) for r in range(rounds)])  # [b, h, lp, dv]
  # Self-attention only when alone.
  alone = (lse <= NEG / 2)[..., None]
  out = jnp.where(alone, jnp.swapaxes(vp, 1, 2).astype(jnp.float32), out)
  out = jnp.swapaxes(out, 1, 2)[:, :length]
  return zero_padded_queries(out.astype(q.dtype), mask)


def lsh_allow_matrix(q: jax.Array, *, rotations: jax.Array, mask: jax.Array | None = None,
                     causal: bool = False, bucket_size: int = 64,
                     n_buckets: int | None = None) -> jax.Array:
  """``[batch, heads, length, length]`` allow-matrix that ``lsh_attention`` computes with
  these hashes (use the unit-normalised ``q`` as keys in ``reference``)."""
  b, length = q.shape[:2]
  valid = jnp.ones((b, length), bool) if mask is None else mask.astype(bool)
  qp = pad_axis(q, bucket_size, axis=1)
  validp = pad_axis(valid, bucket_size, axis=1, value=False)
  _, chunk = _chunk_of(qp, validp, rotations, bucket_size, n_buckets)
  chunk = chunk[..., :length]                               # [b, h, r, l]
  diff = chunk[..., :, None] - chunk[..., None, :]
  near = jnp.any((diff == 0) | (diff == 1), axis=2)          # [b, h, l, l]
  eye = jnp.eye(length, dtype=bool)
  allowed = near & valid[:, None, None, :] & ~eye
  if causal:
    allowed = allowed & jnp.tri(length, dtype=bool)
  alone = ~jnp.any(allowed, axis=-1, keepdims=True)
  return allowed | (alone & eye)


def _check(n_hashes, bucket_size, n_buckets):
  check_positive("lsh", "n_hashes", n_hashes)
  check_positive("lsh", "bucket_size", bucket_size)
  if n_buckets is not None and (not isinstance(n_buckets, int) or n_buckets < 2
                                or n_buckets % 2):
    raise ValueError(f"lsh: option n_buckets={n_buckets!r} must be an even integer >= 2")


@register("lsh")
class LSHAttention(Family):
  """Reformer's multi-round LSH attention (shared-QK; ``k`` is ignored).

  Attributes:
    n_hashes: hash rounds (default 2).
    bucket_size: chunk length ``m`` (default 64).
    n_buckets: buckets per round; default (None) ``2 * ceil(n / bucket_size)`` for an
      example of ``n`` real tokens, so that an average bucket fills half a chunk
      (Kitaev et al., Sec. 2) and trailing padding changes nothing.
    seed: seed of the fixed per-layer rotations (``effx.attention.randomness``).
    redraw: draw new rotations on every training call (the paper's behaviour; default
      True); evaluation always uses the fixed rotations.
  """

  pattern_kind = "content"
  backends = kernel.DYNAMIC_BACKENDS  # splash: its layouts are drawn per example
  derived_defaults = {"n_buckets": "2 * ceil(real tokens / bucket_size), per example"}

  n_hashes: int = 2
  bucket_size: int = 64
  n_buckets: int | None = None
  seed: int = 0
  redraw: bool = True

  def check_options(self):
    _check(self.n_hashes, self.bucket_size, self.n_buckets)

  def rotations(self, q: jax.Array, deterministic: bool = True) -> jax.Array:
    key = family_key(self, seed=self.seed, redraw=self.redraw, deterministic=deterministic)
    n = num_buckets(q.shape[1], self.bucket_size, self.n_buckets)  # enough for any example
    return draw_rotations(key, q.shape[2], q.shape[3], self.n_hashes, n)

  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    check_qkv("lsh", q, k, v, mask)
    with kernel.backend(self.implementation):
      return lsh_attention(q, v, rotations=self.rotations(q, deterministic), mask=mask,
                           causal=self.causal, bucket_size=self.bucket_size,
                           n_buckets=self.n_buckets)

  def allow_matrix(self, q, k=None, *, mask=None, deterministic=True):
    """``[batch, heads, length, length]`` pattern for queries ``q`` (call via ``apply``;
    ``k`` is ignored: keys are the normalised queries)."""
    del k
    return lsh_allow_matrix(q, rotations=self.rotations(q, deterministic), mask=mask,
                            causal=self.causal, bucket_size=self.bucket_size,
                            n_buckets=self.n_buckets)

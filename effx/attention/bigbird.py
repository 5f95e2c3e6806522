"""BigBird block-sparse attention (Zaheer et al., 2020), ITC variant.

Each example's sequence, up to its last real token, is cut into ``nr`` blocks. Global
blocks (the first ``ceil(g/2)`` and last ``floor(g/2)`` of those, as in BigBird's
block-sparse code: first and last block for the default ``g = 2``) attend to everything
and are attended by everything. Every other query block attends to three window blocks
(itself and its neighbours), the global blocks, and ``r`` random blocks drawn, per head
and query block, among its example's other blocks. The draw ranks candidate key blocks
by a hash of ``(seed, head, query block, key block)``: it is fixed in training and in
evaluation, and depends on an example's real extent, not on how much padding follows
(the last global block is the last real block, not the last padded one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from effx.attention import kernel
from effx.attention.base import Family, check_positive, check_qkv, zero_padded_queries
from effx.attention.core import extents, pad_axis, positions
from effx.attention.registry import register


def _hash_uniform(seed: int, head, row, col) -> jax.Array:
  """A uniform number in [0, 1) for each ``(seed, head, row, col)``: a 32-bit integer
  hash (Wellons' "lowbias32" finaliser, applied twice) of the combined indices."""
  x = (jnp.uint32(seed & 0xFFFFFFFF) * jnp.uint32(0x9E3779B1)
       + jnp.asarray(head, jnp.uint32) * jnp.uint32(0x85EBCA77)
       + jnp.asarray(row, jnp.uint32) * jnp.uint32(0xC2B2AE3D)
       + jnp.asarray(col, jnp.uint32))
  for _ in range(2):
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    x = x ^ (x >> 16)
  return (x >> 8).astype(jnp.float32) * 2.0 ** -24


def block_plan(real_blocks: jax.Array, num_blocks: int, num_heads: int, num_global: int,
               num_random: int, seed: int):
  """Which key blocks each query block sees, per example.

  Args:
    real_blocks: ``[batch]`` int, blocks up to each example's last real token (``nr``).
    num_blocks: blocks of the padded input (``n >= nr``).

  Returns:
    ``(table, slot_valid, is_global, global_ids)``: ``table [batch, heads, n, slots]`` key
    block ids of each query block (window, global, random; ``slots = 3 + g + r``);
    ``slot_valid`` marks the slots that hold a distinct block; ``is_global [batch, n]``;
    ``global_ids [batch, g]`` (the back ones clamped to ``>= 0``).
  """
  nr = real_blocks.astype(jnp.int32)[:, None]                  # [b, 1]
  ids = jnp.arange(num_blocks, dtype=jnp.int32)[None, :]       # [1, n]
  front = -(-num_global // 2)
  back = num_global - front
  is_global = ((ids < jnp.minimum(front, nr)) | ((ids >= nr - back) & (ids < nr)))
  global_ids = jnp.concatenate(
      [jnp.broadcast_to(jnp.arange(front, dtype=jnp.int32), (nr.shape[0], front)),
       nr - back + jnp.arange(back, dtype=jnp.int32)], axis=1)  # [b, g]
  global_valid = (global_ids >= 0) & (global_ids < nr)
  global_ids = jnp.maximum(global_ids, 0)

  def is_global_block(j):  # j: [b, ...] block ids
    shape = (nr.shape[0],) + (1,) * (j.ndim - 1)
    nrb = nr.reshape(shape)
    return (j < jnp.minimum(front, nrb)) | ((j >= nrb - back) & (j < nrb))

  rows = jnp.arange(num_blocks, dtype=jnp.int32)
  window = rows[:, None] + jnp.arange(-1, 2, dtype=jnp.int32)[None, :]   # [n, 3]
  window = jnp.broadcast_to(window, (nr.shape[0], num_blocks, 3))
  window_valid = ((window >= 0) & (window < nr[:, :, None])
                  & ~is_global_block(window))
  # Random blocks: the r best-ranked candidates (real, outside the window and globals).
  cols = jnp.arange(num_blocks, dtype=jnp.int32)
  score = _hash_uniform(seed, jnp.arange(num_heads)[:, None, None], rows[None, :, None],
                        cols[None, None, :])                            # [h, n, n]
  near = jnp.abs(rows[:, None] - cols[None, :]) <= 1
  candidate = ((cols[None, None, :] < nr[:, :, None]) & ~near[None]
               & ~is_global_block(jnp.broadcast_to(cols, (nr.shape[0], 1, num_blocks))))
  score = jnp.where(candidate[:, None], score[None], -1.0)              # [b, h, n, n]
  if num_random:
    best, random_ids = jax.lax.top_k(score, min(num_random, num_blocks))
  else:
    best, random_ids = score[..., :0], jnp.zeros(score.shape[:-1] + (0,), jnp.int32)
  random_valid = best >= 0
  b = nr.shape[0]
  # Invalid window slots point outside [0, n); clip them to real blocks so that gathers
  # stay in range (they are masked).
  window = jnp.clip(window, 0, num_blocks - 1)
  table = jnp.concatenate([
      jnp.broadcast_to(window[:, None], (b, num_heads, num_blocks, 3)),
      jnp.broadcast_to(global_ids[:, None, None, :], (b, num_heads, num_blocks, num_global)),
      random_ids.astype(jnp.int32)], axis=-1)
  slot_valid = jnp.concatenate([
      jnp.broadcast_to(window_valid[:, None], (b, num_heads, num_blocks, 3)),
      jnp.broadcast_to(global_valid[:, None, None, :], (b, num_heads, num_blocks, num_global)),
      random_valid], axis=-1)
  return table, slot_valid, is_global, global_ids


def bigbird_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                      block_size: int = 64, num_random_blocks: int = 3,
                      num_global_blocks: int = 2, seed: int = 0) -> jax.Array:
  """BigBird-ITC block-sparse attention (bidirectional only).

  Args:
    q, k: ``[batch, length, heads, head_dim]``; v: ``[batch, length, heads, head_dim_v]``.
    mask: optional ``[batch, length]`` padding mask (True = real token).
    block_size: block length; other lengths are padded to whole blocks internally.
    num_random_blocks: random key blocks per query block and head.
    num_global_blocks: global blocks (module docstring says which).
    seed: seed of the random block choice.

  Returns:
    ``[batch, length, heads, head_dim_v]`` in ``q``'s dtype; zeros at padded queries.
  """
  mask = check_qkv("bigbird", q, k, v, mask)
  _check(block_size, num_random_blocks, num_global_blocks)
  b, length, h, _ = q.shape
  bs = block_size
  n = -(-length // bs)
  real_blocks = -(-extents(b, length, mask) // bs)
  table, slot_valid, _, global_ids = block_plan(real_blocks, n, h, num_global_blocks,
                                                num_random_blocks, seed)
  pos, valid = positions(b, length, mask)
  # Window, global and random blocks of every query block: a dynamic layout (it depends
  # on each example's extent), one pass of the block-sparse kernel.
  layout = kernel.Layout.from_table(table, slot_valid, bs, bs, n)
  out, _ = kernel.attend(q, k, v, layout, q_pos=pos, k_pos=pos, k_valid=valid)
  if num_global_blocks:
    # Global query blocks see every real key.
    rows_pos = (global_ids[:, :, None] * bs + jnp.arange(bs)[None, None, :]).reshape(b, -1)
    qg = jnp.take_along_axis(pad_axis(q, bs, axis=1), rows_pos[:, :, None, None], axis=1)
    full = kernel.Layout.full(rows_pos.shape[1], length, bs, min(length, 512))
    rows, _ = kernel.attend(qg, k, v, full, q_pos=rows_pos, k_pos=pos, k_valid=valid)
    out = pad_axis(out, bs, axis=1)
    out = out.at[jnp.arange(b)[:, None], rows_pos].set(rows)[:, :length]
  return zero_padded_queries(out.astype(q.dtype), mask)


def _check(block_size, num_random_blocks, num_global_blocks):
  check_positive("bigbird", "block_size", block_size)
  for option, value in (("num_random_blocks", num_random_blocks),
                        ("num_global_blocks", num_global_blocks)):
    if not isinstance(value, int) or value < 0:
      raise ValueError(f"bigbird: option {option}={value!r} must be a non-negative integer")


@register("bigbird")
class BigBirdAttention(Family):
  """Block-sparse window + global + random attention; bidirectional only.

  Attributes:
    block_size: block length (default 64).
    num_random_blocks: random blocks per query block (default 3).
    num_global_blocks: global blocks (default 2: the first and the last real block).
    seed: seed of the random blocks, fixed for the module's lifetime (default 0).
  """

  pattern_kind = "static"
  backends = kernel.DYNAMIC_BACKENDS  # splash: its layouts are drawn per example

  block_size: int = 64
  num_random_blocks: int = 3
  num_global_blocks: int = 2
  seed: int = 0

  supports_causal = False

  def check_options(self):
    _check(self.block_size, self.num_random_blocks, self.num_global_blocks)

  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    del deterministic  # the random blocks are fixed by `seed`
    with kernel.backend(self.implementation):
      return bigbird_attention(q, k, v, mask=mask, block_size=self.block_size,
                               num_random_blocks=self.num_random_blocks,
                               num_global_blocks=self.num_global_blocks, seed=self.seed)

  def allow_matrix(self, length: int, num_heads: int = 1) -> np.ndarray:
    """``[num_heads, length, length]`` allow-matrix of an unpadded input of ``length``
    tokens (random blocks differ per head). A padded example's pattern is that of its
    extent (last real position + 1)."""
    bs = self.block_size
    n = -(-length // bs)
    table, slot_valid, is_global, _ = jax.tree.map(np.asarray, block_plan(
        jnp.array([n]), n, num_heads, self.num_global_blocks, self.num_random_blocks,
        self.seed))
    blocks = np.zeros((num_heads, n, n), bool)
    blocks[:, is_global[0], :] = True
    for h in range(num_heads):
      for i in np.flatnonzero(~is_global[0]):
        blocks[h, i, table[0, h, i][slot_valid[0, h, i]]] = True
    allowed = blocks.repeat(bs, axis=1).repeat(bs, axis=2)
    return allowed[:, :length, :length]

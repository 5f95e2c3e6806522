"""BigBird block-sparse attention (Zaheer et al., 2020), ITC variant.

The sequence is cut into blocks. Global blocks (the first ``ceil(g/2)`` and last
``floor(g/2)``, as in BigBird's block-sparse code: first and last block for the default
``g = 2``) attend to everything and are attended by everything. Every other query block
attends to three window blocks (itself and its neighbours), the global blocks, and
``r`` random blocks, drawn per head and per block from a NumPy generator seeded with
``seed`` when the computation is traced: the pattern is fixed for a given length, seed
and head count, in training and in evaluation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from effx.attention.base import Family, check_positive, check_qkv, zero_padded_queries
from effx.attention.core import grouped_attention, pad_axis, positions
from effx.attention.registry import register


@functools.lru_cache(maxsize=64)
def block_plan(num_blocks: int, num_heads: int, num_global: int, num_random: int, seed: int):
  """Which key blocks each non-global query block sees.

  Returns:
    ``(global_ids, rest_ids, table, slot_valid)``: global block ids; the other block ids;
    ``table [heads, len(rest_ids), slots]`` of key block ids; ``slot_valid`` marks slots
    that hold a distinct block (near the ends there are fewer than ``slots``).
  """
  num_global = min(num_global, num_blocks)
  front = -(-num_global // 2)
  global_ids = sorted(set(range(front)) | set(range(num_blocks - (num_global - front),
                                                    num_blocks)))
  rest_ids = [i for i in range(num_blocks) if i not in global_ids]
  slots = 3 + len(global_ids) + num_random
  table = np.zeros((num_heads, len(rest_ids), slots), np.int32)
  slot_valid = np.zeros((num_heads, len(rest_ids), slots), bool)
  rng = np.random.default_rng(seed)
  for h in range(num_heads):
    for row, i in enumerate(rest_ids):
      fixed = sorted({j for j in (i - 1, i, i + 1) if 0 <= j < num_blocks} | set(global_ids))
      candidates = [j for j in range(num_blocks) if j not in fixed]
      pick = rng.choice(candidates, size=min(num_random, len(candidates)), replace=False)
      ids = fixed + sorted(int(j) for j in pick)
      table[h, row, :len(ids)] = ids
      slot_valid[h, row, :len(ids)] = True
  return tuple(global_ids), tuple(rest_ids), table, slot_valid


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
  dv = v.shape[-1]
  n = -(-length // block_size)
  glob, rest, table, slot_valid = block_plan(n, h, num_global_blocks, num_random_blocks, seed)
  _, valid = positions(b, length, mask)
  valid = pad_axis(valid, block_size, axis=1, value=False)    # [b, n * bs]
  scale = q.shape[-1] ** -0.5

  def blocks(x):
    x = pad_axis(x, block_size, axis=1)
    return x.reshape(b, n, block_size, *x.shape[2:])

  qb, kb, vb = blocks(q), blocks(k), blocks(v)                  # [b, n, bs, h, d]
  out = jnp.zeros((b, n, block_size, h, dv), jnp.float32)
  if rest:
    rest_ids = np.array(rest)
    # Per-head gather of key blocks: [b, rest, slots, bs, h, d] -> [b, rest, slots*bs, h, d].
    def gather(xb):
      per_head = jax.vmap(lambda x, t: x[:, t], in_axes=(3, 0), out_axes=4)
      g = per_head(xb, jnp.asarray(table))                     # [b, rest, slots, bs, h, d]
      return g.reshape(b, len(rest), -1, h, xb.shape[-1])
    key_pos = table[..., None] * block_size + np.arange(block_size)   # [h, rest, slots, bs]
    key_valid = (valid[:, key_pos] & slot_valid[None, ..., None])      # [b, h, rest, slots, bs]
    key_valid = key_valid.reshape(b, h, len(rest), -1).swapaxes(1, 2)  # [b, rest, h, K]
    rows, _ = grouped_attention(qb[:, rest_ids], gather(kb), gather(vb),
                                key_valid[:, :, :, None, :], scale=scale)
    out = out.at[:, rest_ids].set(rows)
  if glob:
    glob_ids = np.array(glob)
    qg = qb[:, glob_ids].reshape(b, -1, h, q.shape[-1])
    rows, _ = grouped_attention(qg, kb.reshape(b, -1, h, k.shape[-1]),
                                vb.reshape(b, -1, h, dv), valid[:, None, None, :], scale=scale)
    out = out.at[:, glob_ids].set(rows.reshape(b, len(glob), block_size, h, dv))
  out = out.reshape(b, n * block_size, h, dv)[:, :length]
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
    num_global_blocks: global blocks (default 2: first and last).
    seed: seed of the random blocks, fixed for the module's lifetime (default 0).
  """

  pattern_kind = "static"

  block_size: int = 64
  num_random_blocks: int = 3
  num_global_blocks: int = 2
  seed: int = 0

  supports_causal = False

  def check_options(self):
    _check(self.block_size, self.num_random_blocks, self.num_global_blocks)

  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    del deterministic  # the random blocks are fixed by `seed`
    return bigbird_attention(q, k, v, mask=mask, block_size=self.block_size,
                             num_random_blocks=self.num_random_blocks,
                             num_global_blocks=self.num_global_blocks, seed=self.seed)

  def allow_matrix(self, length: int, num_heads: int = 1) -> np.ndarray:
    """``[num_heads, length, length]`` allow-matrix (random blocks differ per head)."""
    bs = self.block_size
    n = -(-length // bs)
    glob, rest, table, slot_valid = block_plan(n, num_heads, self.num_global_blocks,
                                               self.num_random_blocks, self.seed)
    blocks = np.zeros((num_heads, n, n), bool)
    blocks[:, list(glob), :] = True
    for h in range(num_heads):
      for row, i in enumerate(rest):
        blocks[h, i, table[h, row][slot_valid[h, row]]] = True
    allowed = blocks.repeat(bs, axis=1).repeat(bs, axis=2)
    return allowed[:, :length, :length]

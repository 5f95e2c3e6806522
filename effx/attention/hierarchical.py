"""Hierarchical attention (H-Transformer-1D; Zhu & Soricut, 2021): exact near the diagonal,
coarsened further away, O(length * block_size) time and memory.

Tokens are grouped into a hierarchy: at level ``l`` a coarse token stands for ``2**l``
consecutive tokens, and the coarse sequence is cut into blocks of ``block_size`` (the
paper's ``Nr``). Query ``i`` meets key ``j`` at the finest level at which their coarse
blocks are equal or adjacent, ``l(i, j) = min{l : |b_i // 2**l - b_j // 2**l| <= 1}`` with
``b = position // block_size``: level 0 is exact attention in the diagonal block and its
two neighbours; each coarser level adds only its two neighbour blocks, less the quarter
the finer level already covered. At level ``l`` the logit of the pair is that of the
coarse query and key, the means of the ``2**l`` queries and keys they stand for (so the
mean of the fine logits of the tile), and the value is the sum of the ``2**l`` values;
each level's numerators and row sums (counting the real tokens under a coarse key) are
interpolated back to the fine rows (each coarse row repeated), summed over levels and
divided. That is exactly a softmax over all keys with the far logits replaced by tile
means, which is how the tests check it.

Padding: means and counts run over real tokens only, and groups are aligned from
position 0, so trailing padding changes no real output. Causal: only the diagonal block
(lower triangle) and the left neighbours; a coarse query is the *first* token of its
group, not the mean (the mean would carry later tokens into earlier outputs).

Not decodable token by token here: a coarse key's mean changes with every token its
group receives, so a step would recompute each level's last group (a per-level running
sum would do it; not written); decoding recomputes the prefix instead.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from effx.attention.base import Family, check_qkv, zero_padded_queries
from effx.attention.core import NEG
from effx.attention.registry import register


def num_levels(length: int, block_size: int) -> int:
  """Levels of the hierarchy: ``ceil(log2(blocks))``, at least 1 (the sequence is padded
  to ``block_size * 2**levels`` internally)."""
  return max(1, math.ceil(math.log2(-(-length // block_size))))


def level_matrix(length: int, block_size: int, causal: bool = False) -> np.ndarray:
  """``[length, length]`` int: the level at which query ``i`` meets key ``j`` (0: exact,
  ``l``: through tokens coarsened ``2**l`` times; -1: never, a future key when causal)."""
  blocks = np.arange(length) // block_size
  level = np.full((length, length), -1)
  for lvl in range(num_levels(length, block_size) + 1):
    near = np.abs((blocks[:, None] >> lvl) - (blocks[None, :] >> lvl)) <= 1
    level = np.where((level < 0) & near, lvl, level)
  if causal:
    level = np.where(np.tri(length, dtype=bool), level, -1)
  return level


def _pairs(x, axis=1):
  """Sums of neighbouring pairs along ``axis`` (one level coarser)."""
  shape = x.shape[:axis] + (x.shape[axis] // 2, 2) + x.shape[axis + 1:]
  return x.reshape(shape).sum(axis=axis + 1)


def _neighbours(x):
  """``(left, right)``: each block's previous and next block (zeros past the ends);
  ``x`` is ``[batch, blocks, block, ...]``."""
  zero = jnp.zeros_like(x[:, :1])
  return (jnp.concatenate([zero, x[:, :-1]], axis=1), jnp.concatenate([x[:, 1:], zero], axis=1))


def _level(q, k, v, count, level, causal, nr):
  """One level's row statistics ``(max, numerator, row sum)`` per coarse query,
  ``[b, n, h]``, ``[b, n, h, dv]``, ``[b, n, h]`` (``n`` coarse tokens).

  ``q``, ``k`` are the coarse queries and keys ``[b, n, h, d]``, ``v`` the summed values
  and ``count`` ``[b, n]`` the real tokens under each coarse key."""
  b, n, h, _ = q.shape
  nb = n // nr

  def blocked(x):
    return x.reshape((b, nb, nr) + x.shape[2:])

  qb, kb, vb, cb = blocked(q), blocked(k), blocked(v), blocked(count)
  (kl, kr), (vl, vr), (cl, cr) = _neighbours(kb), _neighbours(vb), _neighbours(cb)
  r, c = np.arange(nr)[:, None], np.arange(nr)[None, :]
  if level == 0:  # the diagonal block and both neighbours, exactly
    parts = [(kl, vl, cl, np.ones((nr, nr), bool)), (kb, vb, cb, (c <= r) if causal else None)]
    if not causal:
      parts.append((kr, vr, cr, np.ones((nr, nr), bool)))
  else:  # the neighbours, less the quarter the finer level covered
    parts = [(kl, vl, cl, ~((r < nr // 2) & (c >= nr // 2)))]
    if not causal:
      parts.append((kr, vr, cr, ~((r >= nr // 2) & (c < nr // 2))))
  keys = jnp.concatenate([p[0] for p in parts], axis=2)        # [b, nb, K, h, d]
  values = jnp.concatenate([p[1] for p in parts], axis=2)      # [b, nb, K, h, dv]
  counts = jnp.concatenate([p[2] for p in parts], axis=2)      # [b, nb, K]
  shape = np.concatenate([np.ones((nr, nr), bool) if p[3] is None else p[3] for p in parts],
                         axis=1)                               # [nr, K]
  allowed = (counts[:, :, None, None, :] > 0) & shape          # [b, nb, 1, nr, K]
  s = jnp.einsum("bnqhd,bnkhd->bnhqk", qb, keys)
  s = jnp.where(allowed, s, NEG)
  top = jax.lax.stop_gradient(jnp.max(s, axis=-1))              # [b, nb, h, nr]
  p = jnp.where(allowed, jnp.exp(s - top[..., None]), 0.0)
  num = jnp.einsum("bnhqk,bnkhe->bnqhe", p, values)
  den = jnp.einsum("bnhqk,bnk->bnqh", p, counts)
  top = jnp.swapaxes(top, 2, 3)                                 # [b, nb, nr, h]
  return top.reshape(b, n, h), num.reshape(b, n, h, -1), den.reshape(b, n, h)


def _merge(a, b):
  """Two sets of row statistics over disjoint keys, as one."""
  top = jnp.maximum(a[0], b[0])
  wa, wb = jnp.exp(a[0] - top), jnp.exp(b[0] - top)
  return top, wa[..., None] * a[1] + wb[..., None] * b[1], wa * a[2] + wb * b[2]


def hierarchical_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                           mask: jax.Array | None = None, causal: bool = False,
                           block_size: int = 16) -> jax.Array:
  """Hierarchical attention (H-Transformer-1D).

  Args:
    q, k: ``[batch, length, heads, head_dim]``; v: ``[batch, length, heads, head_dim_v]``.
    mask: optional ``[batch, length]`` padding mask (True = real token).
    causal: only earlier keys; coarse queries are their group's first token.
    block_size: ``Nr``, the block length of every level (even; the paper's 16 for LRA).
      Exact attention within ``block_size`` to ``2 * block_size`` positions; with
      ``length <= 2 * block_size`` it is dense attention.

  Returns:
    ``[batch, length, heads, head_dim_v]`` in ``q``'s dtype; zeros at padded queries.
  """
  mask = check_qkv("hierarchical", q, k, v, mask)
  _check(block_size)
  b, length, h, d = q.shape
  levels = num_levels(length, block_size)
  padded = block_size * 2 ** levels
  valid = jnp.ones((b, length), bool) if mask is None else mask
  valid = jnp.pad(valid, ((0, 0), (0, padded - length)))
  real = valid.astype(jnp.float32)

  def prepare(x):
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, padded - length), (0, 0), (0, 0)))
    return x * real[:, :, None, None]

  q_sum, k_sum, v_sum = prepare(q * d ** -0.5), prepare(k), prepare(v)
  first = q_sum  # causal coarse queries: each group's first token
  count = real
  stats = []
  for level in range(levels):
    if level:
      q_sum, k_sum, v_sum, count = (_pairs(x) for x in (q_sum, k_sum, v_sum, count))
    per = jnp.maximum(count, 1.0)[:, :, None, None]
    coarse_q = first[:, ::2 ** level] if causal else q_sum / per
    stats.append(_level(coarse_q, k_sum / per, v_sum, count, level, causal, block_size))
  # Interpolate from the coarsest level down: each coarse row is its two finer rows'.
  total = stats[-1]
  for level in range(levels - 2, -1, -1):
    total = _merge(stats[level], tuple(jnp.repeat(x, 2, axis=1) for x in total))
  _, num, den = total
  out = num / jnp.where(den > 0, den, 1.0)[..., None]
  return zero_padded_queries(out[:, :length].astype(q.dtype), mask)


def _check(block_size):
  if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
    raise ValueError(f"hierarchical: option block_size={block_size!r} must be an even "
                     f"integer >= 2 (each level splits its blocks in halves)")


@register("hierarchical")
class HierarchicalAttention(Family):
  """Hierarchical attention (H-Transformer-1D, Zhu & Soricut 2021), see
  ``hierarchical_attention``.

  Attributes:
    block_size: ``Nr``, the block length at every level (even; default 16, the paper's
      LRA setting).
  """

  block_size: int = 16

  def check_options(self):
    _check(self.block_size)

  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    del deterministic
    return hierarchical_attention(q, k, v, mask=mask, causal=self.causal,
                                  block_size=self.block_size)

  def level_matrix(self, length: int) -> np.ndarray:
    """``[length, length]``: the level at which each query meets each key (see
    ``level_matrix``)."""
    return level_matrix(length, self.block_size, self.causal)

"""Sliding-window attention computed in blocks: O(length * window), never length^2."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from effx.attention.base import Family, check_positive, check_qkv, zero_padded_queries
from effx.attention.core import Band, grouped_attention, neighbour_blocks, pad_axis, positions
from effx.attention.registry import register

# Blocks shorter than this make many tiny matmuls; a larger block only wastes
# O(length * block) work outside the band, which stays linear in length.
MIN_BLOCK = 64


def local_parts(q, k, v, *, mask, causal, window, rule: Callable | None = None):
  """Banded attention as ``(out [b, l, h, dv] float32, lse [b, l, h])``.

  Query ``i`` sees key ``j`` iff ``|i - j| <= window`` (and ``j <= i`` when causal), the
  key is real, and ``rule(i, j)`` holds. Queries are cut into blocks of
  ``block >= window`` positions; each block sees its own keys and those of the block
  before (and after, unless causal), which covers the band.
  """
  b, length, h, _ = q.shape
  block = min(length, max(window, MIN_BLOCK))
  padded = -(-length // block) * block
  _, valid = positions(b, length, mask)
  pos = jnp.broadcast_to(jnp.arange(padded, dtype=jnp.int32), (b, padded))

  def blocks(x, fill=0):
    x = pad_axis(x, block, axis=1, value=fill)
    return x.reshape(b, -1, block, *x.shape[2:])

  after = 0 if causal else 1
  qb, qpos = blocks(q), blocks(pos)
  kb = neighbour_blocks(blocks(k), 1, after)
  vb = neighbour_blocks(blocks(v), 1, after)
  kpos = neighbour_blocks(blocks(pos), 1, after)
  kvalid = neighbour_blocks(blocks(valid, False), 1, after, fill=False)
  qp, kp = qpos[..., :, None], kpos[..., None, :]            # [b, n, block, 1], [b, n, 1, K]
  allowed = kvalid[..., None, :] & Band(window)(qp, kp)      # [b, n, block, K]
  if causal:
    allowed = allowed & (kp <= qp)
  if rule is not None:
    allowed = allowed & rule(qp, kp)
  out, lse = grouped_attention(qb, kb, vb, allowed[:, :, None], scale=q.shape[-1] ** -0.5)
  out = out.reshape(b, -1, h, v.shape[-1])[:, :length]
  return out, lse.reshape(b, -1, h)[:, :length]


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                    causal: bool = False, window: int = 128) -> jax.Array:
  """Sliding-window attention.

  Args:
    q, k: ``[batch, length, heads, head_dim]``; v: ``[batch, length, heads, head_dim_v]``.
    mask: optional ``[batch, length]`` padding mask (True = real token).
    causal: see only the current and the ``window`` previous positions.
    window: one-sided width: query ``i`` sees keys ``j`` with ``|i - j| <= window``
      (``2 * window + 1`` keys; ``window + 1`` when causal). Any length works; the
      sequence is padded to whole blocks internally.

  Returns:
    ``[batch, length, heads, head_dim_v]`` in ``q``'s dtype; zeros at padded queries.
  """
  mask = check_qkv("local", q, k, v, mask)
  check_positive("local", "window", window)
  out, _ = local_parts(q, k, v, mask=mask, causal=causal, window=window)
  return zero_padded_queries(out.astype(q.dtype), mask)


def band_pattern(length: int, window: int, causal: bool, dilation: int = 1) -> np.ndarray:
  """``[length, length]``: ``|i - j| <= window * dilation``, ``(i - j) % dilation == 0``."""
  diff = np.arange(length)[:, None] - np.arange(length)[None, :]
  allowed = (np.abs(diff) <= window * dilation) & (diff % dilation == 0)
  return allowed & (diff >= 0) if causal else allowed


@register("local")
class LocalAttention(Family):
  """Sliding-window ("local") attention, computed blockwise.

  Attributes:
    window: one-sided window: each query sees the ``window`` positions on each side
      (only the previous ones when causal) and itself. Default 128.
  """

  pattern_kind = "static"

  window: int = 128

  def check_options(self):
    check_positive("local", "window", self.window)

  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    del deterministic
    return local_attention(q, k, v, mask=mask, causal=self.causal, window=self.window)

  def allow_matrix(self, length: int, num_heads: int = 1) -> np.ndarray:
    """``[num_heads, length, length]`` band allow-matrix."""
    return np.broadcast_to(band_pattern(length, self.window, self.causal),
                           (num_heads, length, length))

"""Longformer attention (Beltagy et al., 2020): sliding window + symmetric global tokens."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from effx.attention import decoding, kernel, local
from effx.attention.base import Family, check_positive, check_qkv, zero_padded_queries
from effx.attention.core import AnyOf, Band, KeyIn, positions
from effx.attention.local import band_pattern, local_parts
from effx.attention.registry import register


def _global_positions(global_tokens: Sequence[int], length: int) -> tuple[int, ...]:
  """Resolves negative indices and checks range; sorted, without duplicates."""
  out = set()
  for g in global_tokens:
    if not isinstance(g, (int, np.integer)) or not -length <= g < length:
      raise ValueError(f"longformer: option global_tokens contains {g!r}, which is not a "
                       f"position in a sequence of length {length} "
                       f"(valid: {-length}..{length - 1})")
    out.add(int(g) % length)
  return tuple(sorted(out))


def longformer_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                         mask: jax.Array | None = None, causal: bool = False, window: int = 128,
                         global_tokens: Sequence[int] = (0,)) -> jax.Array:
  """Sliding-window attention plus global tokens that see and are seen by every position.

  Query ``i`` sees key ``j`` iff ``|i - j| <= window``, or ``i`` is global, or ``j`` is
  global (and ``j <= i`` when causal). The window part runs blockwise, the global rows
  and columns densely over their few tokens; the parts are merged into one exact softmax.
  Projections are shared with the window part (Longformer's separate global projections
  would be parameters of ``SelfAttention``, not of the mixing).

  Args:
    q, k: ``[batch, length, heads, head_dim]``; v: ``[batch, length, heads, head_dim_v]``.
    mask: optional ``[batch, length]`` padding mask (True = real token).
    causal: see only earlier positions (global keys included).
    window: one-sided window width, as in ``local``.
    global_tokens: positions with global attention; negative values count from the end
      (default ``(0,)``: a leading CLS token).

  Returns:
    ``[batch, length, heads, head_dim_v]`` in ``q``'s dtype; zeros at padded queries.
  """
  mask = check_qkv("longformer", q, k, v, mask)
  check_positive("longformer", "window", window)
  b, length = q.shape[:2]
  glob = _global_positions(global_tokens, length)
  if not glob:
    out, _ = local_parts(q, k, v, mask=mask, causal=causal, window=window)
    return zero_padded_queries(out.astype(q.dtype), mask)
  pos, valid = positions(b, length, mask)
  # Every query: its window and the global keys, in one pass of the kernel: the band's
  # blocks plus the blocks that hold a global key.
  block = local.band_block(window, length)
  n = -(-length // block)
  extra = np.zeros((n, n), bool)
  extra[:, sorted({g // block for g in glob})] = True
  out, _ = local_parts(q, k, v, mask=mask, causal=causal, window=window,
                       rule=AnyOf((Band(window), KeyIn(glob))), extra_blocks=extra)
  # Global queries: full rows.
  idx = np.array(glob, np.int32)
  qpos = idx[None]  # one row for every example
  layout = kernel.Layout.full(idx.size, length, min(idx.size, 512), min(length, 512))
  rows, _ = kernel.attend(q[:, idx], k, v, layout, q_pos=qpos, k_pos=pos, k_valid=valid,
                          causal=causal)
  out = out.at[:, idx].set(rows)
  return zero_padded_queries(out.astype(q.dtype), mask)


def _check(window, global_tokens):
  check_positive("longformer", "window", window)
  for g in global_tokens:
    if not isinstance(g, (int, np.integer)):
      raise ValueError(f"longformer: option global_tokens={tuple(global_tokens)!r} must hold "
                       "integer positions")


@register("longformer")
class LongformerAttention(Family):
  """Sliding window + symmetric global attention.

  Attributes:
    window: one-sided window width (default 128).
    global_tokens: tuple of global positions, negatives from the end (default ``(0,)``).
  """

  pattern_kind = "static"
  backends = kernel.BACKENDS

  decodable = True

  window: int = 128
  global_tokens: tuple[int, ...] = (0,)

  def check_options(self):
    _check(self.window, self.global_tokens)

  def decode_init(self, batch, heads, head_dim, head_dim_v, capacity, dtype=jnp.float32):
    """A key cache of ``capacity`` slots (global keys reach back to the start)."""
    if any(g < 0 for g in self.global_tokens):
      raise ValueError(f"longformer: global_tokens={self.global_tokens} counts from the end, "
                       "which a sequence being generated does not have; use positions >= 0")
    return decoding.cache_init(batch, capacity, heads, head_dim, head_dim_v, dtype)

  def decode_step(self, q, k, v, state, position, valid):
    glob = jnp.asarray(self.global_tokens or (-1,), jnp.int32)

    def allow(i, j):
      is_global = lambda p: jnp.any(p[..., None] == glob, axis=-1)  # noqa: E731
      return ((i - j <= self.window) | is_global(j) | is_global(i))[:, None]
    return decoding.cache_step(q, k, v, state, position, valid, allow)

  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    del deterministic
    with kernel.backend(self.implementation):
      return longformer_attention(q, k, v, mask=mask, causal=self.causal, window=self.window,
                                  global_tokens=self.global_tokens)

  def allow_matrix(self, length: int, num_heads: int = 1) -> np.ndarray:
    """``[num_heads, length, length]``: band plus global rows and columns."""
    allowed = band_pattern(length, self.window, False)
    glob = list(_global_positions(self.global_tokens, length))
    allowed[glob, :] = True
    allowed[:, glob] = True
    if self.causal:
      allowed &= np.tri(length, dtype=bool)
    return np.broadcast_to(allowed, (num_heads, length, length))

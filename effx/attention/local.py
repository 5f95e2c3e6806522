"""Sliding-window attention computed in blocks: O(length * window), never length^2."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from effx.attention import decoding, kernel
from effx.attention.base import Family, check_positive, check_qkv, zero_padded_queries
from effx.attention.core import AllOf, Band, positions
from effx.attention.dense import cudnn_applies
from effx.attention.registry import register


def band_block(window: int, length: int) -> int:
  """Block length of a band of one-sided ``window``: about the window (each query block
  then visits 3 key blocks), 64 to 512. Smaller blocks waste less work outside the band
  but make smaller matmuls; on a 2-core CPU block = window was fastest for windows of 64,
  128 and 384 among blocks of 64..512."""
  return min(length, max(64, min(window, 512)))


def local_parts(q, k, v, *, mask, causal, window, rule: Callable | None = None,
                extra_blocks: np.ndarray | None = None):
  """Banded attention as ``(out [b, l, h, dv] float32, lse [b, l, h])``.

  Query ``i`` sees key ``j`` iff ``|i - j| <= window`` (and ``j <= i`` when causal), the
  key is real, and ``rule(i, j)`` holds. The band runs through the block-sparse kernel:
  each block of ``band_block(window, length)`` queries visits the key blocks its band
  touches.

  ``extra_blocks`` (a boolean ``[num_blocks, num_blocks]``) adds visited block pairs; then
  ``rule`` alone says which pairs are allowed (it must imply the band outside them).
  """
  b, length = q.shape[:2]
  block = band_block(window, length)
  layout = kernel.Layout.band(length, block, window, 0 if causal else window)
  if extra_blocks is not None:
    layout = kernel.Layout.from_blocks(layout.blocks() | extra_blocks, block, block)
    allow = rule
  else:
    allow = Band(window) if rule is None else AllOf((Band(window), rule))
  pos, valid = positions(b, length, mask)
  return kernel.attend(q, k, v, layout, q_pos=pos, k_pos=pos, k_valid=valid, causal=causal,
                       rule=allow)


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


def cudnn_local(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                window: int = 128) -> jax.Array:
  """Causal sliding-window attention on cuDNN's fused kernel (a GPU; float16 / bfloat16,
  ``head_dim_v == head_dim`` a multiple of 8 up to 128): query ``i`` sees keys
  ``i - window .. i``, as ``local_attention(causal=True)``. Padding goes in as a key mask."""
  mask = check_qkv("local", q, k, v, mask)
  kernel.note("cudnn")
  out = jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None, None],
                                     is_causal=True, local_window_size=(window, 0),
                                     implementation="cudnn")
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
  backends = kernel.BACKENDS + ("cudnn",)  # cudnn: causal only (a left window)
  decodable = True

  window: int = 128

  def check_options(self):
    check_positive("local", "window", self.window)
    if self.implementation == "cudnn" and not self.causal:
      raise ValueError("local: implementation='cudnn' runs causal=True only (cuDNN's "
                       "sliding window is left-sided); use 'pallas' or 'xla'")

  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    del deterministic
    if self.implementation == "cudnn" or (self.implementation == "auto" and self.causal
                                          and cudnn_applies(q, v)):
      return cudnn_local(q, k, v, mask=mask, window=self.window)
    with kernel.backend(self.implementation):
      return local_attention(q, k, v, mask=mask, causal=self.causal, window=self.window)

  def decode_init(self, batch, heads, head_dim, head_dim_v, capacity, dtype=jnp.float32):
    """A ring buffer of the last ``window + 1`` tokens, whatever the context length."""
    return decoding.cache_init(batch, min(self.window + 1, capacity), heads, head_dim,
                               head_dim_v, dtype)

  def decode_step(self, q, k, v, state, position, valid):
    return decoding.cache_step(q, k, v, state, position, valid,
                               lambda i, j: (i - j <= self.window)[:, None])

  def allow_matrix(self, length: int, num_heads: int = 1) -> np.ndarray:
    """``[num_heads, length, length]`` band allow-matrix."""
    return np.broadcast_to(band_pattern(length, self.window, self.causal),
                           (num_heads, length, length))

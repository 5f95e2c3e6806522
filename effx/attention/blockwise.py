"""Exact attention in query/key blocks (Rabe & Staats, 2021; FlashAttention's algorithm): the
block-sparse kernel with every key block visited (key blocks wholly in the future skipped
when causal)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effx.attention import decoding, kernel
from effx.attention.base import Family, check_positive, check_qkv, zero_padded_queries
from effx.attention.core import positions
from effx.attention.dense import full_pattern
from effx.attention.registry import register


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        mask: jax.Array | None = None, causal: bool = False,
                        q_chunk: int = 512, k_chunk: int = 512) -> jax.Array:
  """Exact softmax attention with O(length * chunk) memory in forward and backward.

  Args:
    q, k: ``[batch, length, heads, head_dim]``; v: ``[batch, length, heads, head_dim_v]``.
    mask: optional ``[batch, length]`` padding mask (True = real token).
    causal: forbid attending to later positions (key chunks wholly in the future are
      not visited).
    q_chunk, k_chunk: query and key block lengths of the kernel. Temporaries are
      O(q_chunk * k_chunk) per query block, so O(length * k_chunk) in all (512 x 512,
      1024 x 1024, 2048 x 256 and 4096 x 256 were within 10% of each other on a 2-core
      CPU at 4K; 512 x 512 uses the least memory and packs causal triangles best). A
      length that is not a multiple is padded internally; the result is unchanged.

  Returns:
    ``[batch, length, heads, head_dim_v]`` in ``q``'s dtype; zeros at padded queries.
  """
  mask = check_qkv("blockwise", q, k, v, mask)
  check_positive("blockwise", "q_chunk", q_chunk)
  check_positive("blockwise", "k_chunk", k_chunk)
  pos, valid = positions(q.shape[0], q.shape[1], mask)
  length = q.shape[1]
  layout = kernel.Layout.full(length, length, min(q_chunk, length), min(k_chunk, length),
                              causal=causal)
  out, _ = kernel.attend(q, k, v, layout, q_pos=pos, k_pos=pos, k_valid=valid, causal=causal)
  return zero_padded_queries(out.astype(q.dtype), mask)


@register("blockwise")
class BlockwiseAttention(Family):
  """Memory-efficient exact attention; equals ``dense`` up to float rounding.

  Attributes:
    q_chunk: query block length (default 512).
    k_chunk: key block length (default 512).
  """

  pattern_kind = "static"
  backends = kernel.BACKENDS
  decodable = True

  q_chunk: int = 512
  k_chunk: int = 512

  def check_options(self):
    check_positive("blockwise", "q_chunk", self.q_chunk)
    check_positive("blockwise", "k_chunk", self.k_chunk)

  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    del deterministic
    with kernel.backend(self.implementation):
      return blockwise_attention(q, k, v, mask=mask, causal=self.causal,
                                 q_chunk=self.q_chunk, k_chunk=self.k_chunk)

  def decode_init(self, batch, heads, head_dim, head_dim_v, capacity, dtype=jnp.float32):
    """A key cache of ``capacity`` slots (every earlier token)."""
    return decoding.cache_init(batch, capacity, heads, head_dim, head_dim_v, dtype)

  def decode_step(self, q, k, v, state, position, valid):
    return decoding.cache_step(q, k, v, state, position, valid,
                               lambda i, j: jnp.ones_like(j, bool)[:, None])

  def allow_matrix(self, length: int, num_heads: int = 1):
    """``[num_heads, length, length]``: all ones, lower-triangular if causal."""
    return full_pattern(length, num_heads, self.causal)

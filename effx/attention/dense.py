"""Dense softmax attention: softmax(QK^T / sqrt(d)) V over the whole sequence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from effx.attention import decoding, kernel
from effx.attention.base import Family, check_choice, check_qkv, zero_padded_queries
from effx.attention.core import NEG, positions
from effx.attention.registry import register

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas", "splash")


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                    causal: bool = False, implementation: str = "auto") -> jax.Array:
  """Dense softmax attention.

  Args:
    q, k: ``[batch, length, heads, head_dim]``; v: ``[batch, length, heads, head_dim_v]``.
    mask: optional ``[batch, length]`` padding mask (True = real token).
    causal: forbid attending to later positions.
    implementation: ``"xla"``: einsum and a float32 masked softmax, any backend;
      ``"cudnn"``: cuDNN's fused kernel through ``jax.nn.dot_product_attention`` (GPU only,
      float16/bfloat16, ``head_dim_v == head_dim`` a multiple of 8 up to 128; errors
      elsewhere); ``"pallas"`` / ``"splash"``: ``kernel.attend`` over every block on
      the block-sparse Pallas kernel (flash attention; interpret mode off a GPU) or TPU
      splash attention (interpret mode off a TPU); ``"auto"`` (default): ``"cudnn"`` on
      a GPU when its conditions hold, ``"splash"`` on a TPU, else ``"xla"``. All compute
      the same function.

  Returns:
    ``[batch, length, heads, head_dim_v]`` in ``q``'s dtype; zeros at padded queries.
  """
  mask = check_qkv("dense", q, k, v, mask)
  check_choice("dense", "implementation", implementation, IMPLEMENTATIONS)
  if implementation == "auto":
    implementation = ("cudnn" if cudnn_applies(q, v) else
                      "splash" if kernel.target_platform() == "tpu" else "xla")
  if implementation not in ("pallas", "splash"):  # kernel.attend records its own choice
    kernel.note(implementation)
  if implementation == "cudnn":
    key_mask = None if mask is None else mask[:, None, None, :]  # [b, 1, 1, k]
    out = jax.nn.dot_product_attention(q, k, v, mask=key_mask, is_causal=causal,
                                       implementation="cudnn")
    return zero_padded_queries(out.astype(q.dtype), mask)
  length = q.shape[1]
  if implementation in ("pallas", "splash"):
    block = min(128, max(16, 1 << (length - 1).bit_length()))
    pos, valid = positions(q.shape[0], length, mask)
    out, _ = kernel.attend(q, k, v, kernel.Layout.full(length, length, block, block,
                                                       causal=causal),
                           q_pos=pos, k_pos=pos, k_valid=valid, causal=causal,
                           implementation=implementation)
    return zero_padded_queries(out.astype(q.dtype), mask)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                      preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  allowed = None if mask is None else mask[:, None, None, :]
  if causal:
    tri = jnp.tri(length, dtype=bool)
    allowed = tri if allowed is None else allowed & tri
  if allowed is not None:
    # A real query always has an allowed key (itself), so NEG never makes a whole row;
    # padded queries are zeroed below.
    logits = jnp.where(allowed, logits, NEG)
  # jax.nn.softmax's own derivative rule (y * (g - sum(g * y))) keeps one [h, l, l] array
  # for the backward, where differentiating exp / sum / divide keeps several.
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(jnp.float32))
  return zero_padded_queries(out.astype(q.dtype), mask)


def cudnn_applies(q: jax.Array, v: jax.Array) -> bool:
  """Whether cuDNN's fused attention runs these inputs: a GPU target, float16/bfloat16,
  ``head_dim_v == head_dim``, a multiple of 8 up to 128."""
  return (kernel.target_platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
          and v.shape[-1] == q.shape[-1] and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


@register("dense")
class DenseAttention(Family):
  """Full softmax attention (Vaswani et al., 2017); quadratic time and memory.

  Attributes:
    implementation: ``"auto"`` (default) | ``"xla"`` | ``"cudnn"`` | ``"pallas"`` |
      ``"splash"``, see ``dense_attention``.
  """

  pattern_kind = "static"
  decodable = True
  backends = ("xla", "cudnn", "pallas", "splash")

  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    del deterministic  # no randomness
    return dense_attention(q, k, v, mask=mask, causal=self.causal,
                           implementation=self.implementation)

  def decode_init(self, batch, heads, head_dim, head_dim_v, capacity, dtype=jnp.float32):
    """A key cache of ``capacity`` slots (every earlier token)."""
    return decoding.cache_init(batch, capacity, heads, head_dim, head_dim_v, dtype)

  def decode_step(self, q, k, v, state, position, valid):
    return decoding.cache_step(q, k, v, state, position, valid,
                               lambda i, j: jnp.ones_like(j, bool)[:, None])

  def allow_matrix(self, length: int, num_heads: int = 1):
    """``[num_heads, length, length]`` allow-matrix: all ones, lower-triangular if causal."""
    return full_pattern(length, num_heads, self.causal)


def full_pattern(length: int, num_heads: int, causal: bool) -> np.ndarray:
  """The dense allow-matrix ``[num_heads, length, length]``."""
  allowed = np.tril(np.ones((length, length), bool)) if causal else np.ones((length, length), bool)
  return np.broadcast_to(allowed, (num_heads, length, length))

"""cosFormer (Qin et al., 2022): ReLU kernel attention with a cos-based re-weighting.

The similarity of query ``i`` and key ``j`` is
``s_ij = relu(q_i) . relu(k_j) * cos(pi/2 * (i - j) / M)``, normalised over ``j``. By
``cos(a - b) = cos a cos b + sin a sin b`` it splits into two ReLU feature maps,
``[relu(x) cos(pi i / 2M), relu(x) sin(pi i / 2M)]``, so it runs as linear attention on
``2 * head_dim`` features: O(length) time and memory, causal by chunked prefix sums.
The re-weighting favours nearby tokens (a locality bias) without a softmax.

``M`` must exceed every distance ``|i - j|`` so that the weights stay in ``(0, 1]``. By
default it is the position of the last real token + 1 of each example (so padding does
not change a real token's output); set ``max_len`` to fix it, as a causal language model
trained on segments must (Transformer-XL memory, generation), so that the weight of a pair
depends only on its distance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effx.attention import decoding
from effx.attention.base import Family, check_positive, check_qkv, zero_padded_queries
from effx.attention.core import extents
from effx.attention.linear import feature_attention
from effx.attention.registry import register

f32 = jnp.float32


def cos_features(x: jax.Array, horizon: jax.Array) -> jax.Array:
  """cosFormer's feature map.

  Args:
    x: ``[batch, length, heads, head_dim]`` queries or keys.
    horizon: ``[batch]`` the ``M`` of each example (float32, larger than any distance).

  Returns:
    ``[batch, length, heads, 2 * head_dim]`` float32, non-negative.
  """
  angle = (jnp.pi / 2) * jnp.arange(x.shape[1], dtype=f32)[None, :] / horizon[:, None]
  r = jax.nn.relu(x.astype(f32))
  return jnp.concatenate([r * jnp.cos(angle)[:, :, None, None],
                          r * jnp.sin(angle)[:, :, None, None]], axis=-1)


def cosformer_horizon(length: int, mask: jax.Array | None, batch: int,
                      max_len: int | None) -> jax.Array:
  """``M`` per example: ``max_len`` if given, else last real position + 1 (``[batch]``)."""
  if max_len is not None:
    return jnp.full((batch,), max_len, f32)
  return jnp.maximum(extents(batch, length, mask), 1).astype(f32)


def cosformer_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        mask: jax.Array | None = None, causal: bool = False,
                        max_len: int | None = None, chunk_size: int = 128) -> jax.Array:
  """cosFormer attention.

  Args:
    q, k: ``[batch, length, heads, head_dim]``; v: ``[batch, length, heads, head_dim_v]``.
    mask: optional ``[batch, length]`` padding mask (True = real token).
    causal: prefix sums, in chunks of ``chunk_size``.
    max_len: the re-weighting horizon ``M``; ``None``: each example's extent (see module
      docstring). Must be ``>= length``.

  Returns:
    ``[batch, length, heads, head_dim_v]`` in ``q``'s dtype; zeros at padded queries and
    where a query's ReLU features meet no key's (denominator 0).
  """
  mask = check_qkv("cosformer", q, k, v, mask)
  check_positive("cosformer", "chunk_size", chunk_size)
  check_positive("cosformer", "max_len", max_len, allow_none=True)
  if max_len is not None and q.shape[1] > max_len:
    raise ValueError(f"cosformer: length {q.shape[1]} exceeds max_len={max_len}; the "
                     f"re-weighting cos(pi/2 (i-j)/max_len) needs max_len >= length")
  horizon = cosformer_horizon(q.shape[1], mask, q.shape[0], max_len)
  out = feature_attention(cos_features(q, horizon), cos_features(k, horizon), v, mask=mask,
                          causal=causal, chunk_size=chunk_size)
  return zero_padded_queries(out.astype(q.dtype), mask)


@register("cosformer")
class CosformerAttention(Family):
  """cosFormer: ReLU features with cos re-weighting, linear in length.

  Attributes:
    max_len: re-weighting horizon ``M`` (default ``None``: each example's extent; set it
      for causal models run on segments or generated token by token).
    chunk_size: chunk length of the causal prefix sums (default 128).
  """

  derived_defaults = {"max_len": "each example's extent (last real position + 1)"}

  decodable = True

  max_len: int | None = None
  chunk_size: int = 128

  def check_options(self):
    check_positive("cosformer", "max_len", self.max_len, allow_none=True)
    check_positive("cosformer", "chunk_size", self.chunk_size)

  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    del deterministic
    return cosformer_attention(q, k, v, mask=mask, causal=self.causal, max_len=self.max_len,
                               chunk_size=self.chunk_size)

  def decode_init(self, batch, heads, head_dim, head_dim_v, capacity, dtype=jnp.float32):
    """Running sums over ``2 * head_dim`` features; needs ``max_len >= capacity``."""
    del dtype
    if self.max_len is None:
      raise ValueError("cosformer decodes token by token only with option max_len set: "
                       "its default horizon M is the final sequence's extent, unknown while "
                       "generating; train and decode with attention_kwargs={'max_len': N}")
    if capacity > self.max_len:
      raise ValueError(f"cosformer: decoding {capacity} tokens exceeds max_len="
                       f"{self.max_len} (the re-weighting needs max_len >= length)")
    return decoding.sums_init(batch, heads, 2 * head_dim, head_dim_v)

  def decode_step(self, q, k, v, state, position, valid):
    angle = ((jnp.pi / 2) * position.astype(f32) / self.max_len)[:, None, None]

    def features(x):
      r = jax.nn.relu(x.astype(f32))
      return jnp.concatenate([r * jnp.cos(angle), r * jnp.sin(angle)], axis=-1)
    out, state = decoding.sums_step(features(q), features(k), v, state, valid)
    return out.astype(q.dtype), state

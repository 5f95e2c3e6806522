"""Nyströmformer attention (Xiong et al., 2021).

Softmax attention is approximated through ``m`` landmarks, the segment means of the
queries and keys: ``softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V``, with the
Moore-Penrose pseudo-inverse computed by the paper's iteration
``Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4`` from ``Z0 = A^T / (|A|_1 |A|_inf)``.
With as many landmarks as tokens (segments of one token) and enough iterations it is
exact softmax attention, up to the iteration's float32 floor (about 1e-5 to 1e-4 after
~16 iterations for unit-scale inputs). Cost O(length * m).

Landmarks: each example's ``n`` real tokens (in order, padding skipped) are cut into
exactly ``m`` contiguous segments of ``floor(n / m)`` or ``ceil(n / m)`` tokens (real
token ``r`` goes to segment ``floor(r m / n)``); with ``n < m`` every real token is its own
landmark and the rest are unused. So the number of landmarks never drops when the length
is not a multiple of ``m``, and trailing padding changes nothing. For a length that is a
multiple of ``m`` and no padding, the segments are the paper's.

Keep ``pinv_iters`` small (the paper's 6) when ``m`` is much smaller than the length:
segment-mean landmarks make ``A`` nearly singular, and the truncated iteration acts as a
regulariser; a converged (exact) pseudo-inverse then amplifies noise (measured here:
relative error 0.21 with 2 landmarks at 6 iterations, 4.8 with an exact pinv).

``conv_kernel_size`` adds the authors' skip connection: a depthwise convolution of the
values along the sequence, one kernel per head shared by the head's channels, no bias
(their LRA configurations use 35).

Against Hugging Face's ``NystromformerSelfAttention`` (same landmarks and iterations,
length a multiple of ``m`` and larger than it, no padding) the function is the same,
with ``Z0`` scaled per example and head (HF's ``init_option="exact"``; its default
``"original"`` uses one scale for the whole batch). At length == ``m`` HF switches to
exact softmax; effx keeps the approximation (exact up to the pseudo-inverse iteration). With padding, HF averages padded tokens into the landmarks and
convolves padded values; effx does neither.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from effx.attention.base import Family, check_positive, check_qkv, zero_padded_queries
from effx.attention.core import NEG
from effx.attention.registry import register

f32 = jnp.float32


def _softmax(logits, allowed):
  logits = jnp.where(allowed, logits, NEG)
  weights = jnp.where(allowed, jnp.exp(logits - jax.lax.stop_gradient(
      jnp.max(logits, axis=-1, keepdims=True))), 0.0)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  return weights / jnp.where(denom > 0, denom, 1.0)


def iterative_pinv(a: jax.Array, iters: int) -> jax.Array:
  """Approximate Moore-Penrose inverse of square ``a [..., m, m]`` (Nyströmformer Eq. 8)."""
  eye = jnp.eye(a.shape[-1], dtype=a.dtype)
  norm_1 = jnp.max(jnp.sum(jnp.abs(a), axis=-2), axis=-1)[..., None, None]
  norm_inf = jnp.max(jnp.sum(jnp.abs(a), axis=-1), axis=-1)[..., None, None]
  z = jnp.swapaxes(a, -1, -2) / (norm_1 * norm_inf)
  # einsum, not `@`: every contraction of a family goes through dot_general, where
  # quantization rules (effx.compress.quant) can reach it.
  mm = functools.partial(jnp.einsum, "...ij,...jk->...ik")
  for _ in range(iters):
    az = mm(a, z)
    z = 0.25 * mm(z, 13 * eye - mm(az, 15 * eye - mm(az, 7 * eye - az)))
  return z


def segments(valid: jax.Array, num_landmarks: int) -> jax.Array:
  """Landmark membership ``[batch, length, num_landmarks]`` (float 0/1) of every real token.

  Real token ``r`` (0-based among the real tokens of its example, of which there are
  ``n``) belongs to segment ``floor(r * min(m, n) / n)``; padded tokens to none.
  """
  n = jnp.sum(valid, axis=1, keepdims=True).astype(jnp.int32)          # [b, 1]
  rank = jnp.cumsum(valid, axis=1).astype(jnp.int32) - 1                # [b, l]
  seg = rank * jnp.minimum(num_landmarks, n) // jnp.maximum(n, 1)
  hit = (seg[..., None] == jnp.arange(num_landmarks)) & valid[..., None]
  return hit.astype(f32)


def value_conv(v: jax.Array, kernel: jax.Array) -> jax.Array:
  """Depthwise convolution of ``v [batch, length, heads, dv]`` along the length with
  ``kernel [size, heads]`` (odd ``size``, zero padding, one kernel per head)."""
  b, length, h, dv = v.shape
  size = kernel.shape[0]
  rhs = jnp.repeat(kernel.astype(f32), dv, axis=1)[:, None, :]          # [size, 1, h * dv]
  out = jax.lax.conv_general_dilated(
      v.astype(f32).reshape(b, length, h * dv), rhs, window_strides=(1,),
      padding=[(size // 2, size // 2)], dimension_numbers=("NWC", "WIO", "NWC"),
      feature_group_count=h * dv)
  return out.reshape(b, length, h, dv)


def nystrom_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                      num_landmarks: int = 64, pinv_iters: int = 6,
                      conv_kernel: jax.Array | None = None) -> jax.Array:
  """Nyström approximation of softmax attention (bidirectional).

  Args:
    q, k: ``[batch, length, heads, head_dim]``; v: ``[batch, length, heads, head_dim_v]``.
    mask: optional ``[batch, length]`` padding mask (True = real token).
    num_landmarks: ``m``: segments of each example's real tokens (module docstring).
    pinv_iters: pseudo-inverse iterations (paper: 6).
    conv_kernel: optional ``[size, heads]`` depthwise kernel of the value skip
      connection (``value_conv``), odd ``size``.

  Returns:
    ``[batch, length, heads, head_dim_v]`` in ``q``'s dtype; zeros at padded queries.
  """
  mask = check_qkv("nystrom", q, k, v, mask)
  check_positive("nystrom", "num_landmarks", num_landmarks)
  check_positive("nystrom", "pinv_iters", pinv_iters)
  b, length, h, d = q.shape
  m = num_landmarks
  valid = jnp.ones((b, length), bool) if mask is None else mask
  keep = valid[:, :, None, None].astype(f32)
  qs = q.astype(f32) * d ** -0.25 * keep
  ks = k.astype(f32) * d ** -0.25 * keep
  vs = v.astype(f32) * keep
  member = segments(valid, m)                                  # [b, l, m]
  count = jnp.sum(member, axis=1)                              # [b, m]
  live = count > 0

  def landmarks(x):  # segment means over real tokens: [b, m, h, d]
    return jnp.einsum("blm,blhd->bmhd", member, x) / jnp.maximum(count, 1.0)[:, :, None, None]

  q_land, k_land = landmarks(qs), landmarks(ks)
  kernel_1 = _softmax(jnp.einsum("blhd,bmhd->bhlm", qs, k_land), live[:, None, None, :])
  kernel_2 = _softmax(jnp.einsum("bnhd,bmhd->bhnm", q_land, k_land), live[:, None, None, :])
  both = live[:, None, :, None] & live[:, None, None, :]
  kernel_2 = jnp.where(both, kernel_2, jnp.eye(m, dtype=f32))
  kernel_3 = _softmax(jnp.einsum("bmhd,blhd->bhml", q_land, ks), valid[:, None, None, :])
  context = jnp.einsum("bhml,blhd->bhmd", kernel_3, vs)
  context = jnp.einsum("bhnm,bhmd->bhnd", iterative_pinv(kernel_2, pinv_iters), context)
  out = jnp.einsum("bhlm,bhmd->blhd", kernel_1, context)
  if conv_kernel is not None:
    out = out + value_conv(vs, conv_kernel)
  return zero_padded_queries(out.astype(q.dtype), mask)


@register("nystrom")
class NystromAttention(Family):
  """Nyströmformer landmark attention; bidirectional only.

  Attributes:
    num_landmarks: landmarks ``m`` (default 64), segments of the real tokens.
    pinv_iters: iterations of the pseudo-inverse (default 6, as in the paper).
    conv_kernel_size: odd width of the depthwise value convolution added to the output
      (parameter ``conv_kernel [size, heads]``), or None (default: no convolution, and
      dense attention's parameter tree). The authors' LRA setting is 35.
  """

  num_landmarks: int = 64
  pinv_iters: int = 6
  conv_kernel_size: int | None = None

  supports_causal = False

  def check_options(self):
    check_positive("nystrom", "num_landmarks", self.num_landmarks)
    check_positive("nystrom", "pinv_iters", self.pinv_iters)
    check_positive("nystrom", "conv_kernel_size", self.conv_kernel_size, allow_none=True)
    if self.conv_kernel_size is not None and self.conv_kernel_size % 2 == 0:
      raise ValueError(f"nystrom: option conv_kernel_size={self.conv_kernel_size} must be odd "
                       "(the convolution is centred on each token)")

  @nn.compact
  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    del deterministic
    conv_kernel = None
    if self.conv_kernel_size is not None:
      # PyTorch's Conv default init (uniform, bound 1 / sqrt(fan_in)), as the authors'.
      init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
      conv_kernel = self.param("conv_kernel", nn.with_logical_partitioning(init, (None, "heads")),
                               (self.conv_kernel_size, q.shape[2]), f32)
    return nystrom_attention(q, k, v, mask=mask, num_landmarks=self.num_landmarks,
                             pinv_iters=self.pinv_iters, conv_kernel=conv_kernel)

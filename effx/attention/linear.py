"""Linear attention (Katharopoulos et al., 2020) and the feature-map core it shares with
Performer.

With a non-negative feature map ``phi``, attention becomes
``out_i = phi(q_i)^T S / phi(q_i)^T z`` with ``S = sum_j phi(k_j) v_j^T`` and
``z = sum_j phi(k_j)``: O(length) time and memory. Causal attention uses prefix sums,
computed chunk by chunk: inside a chunk the (chunk x chunk) masked product, across chunks
a running ``(S, z)`` state, so memory stays O(length * features) instead of the
O(length * features * head_dim) of materialised prefix sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effx.attention import decoding
from effx.attention.base import Family, check_positive, check_qkv, zero_padded_queries
from effx.attention.core import NEG, pad_axis
from effx.attention.registry import register

f32 = jnp.float32
TINY = 1e-30


def feature_attention(phi_q: jax.Array, phi_k: jax.Array, v: jax.Array, *,
                      mask: jax.Array | None = None, causal: bool = False,
                      chunk_size: int = 128, k_log_scale: jax.Array | None = None) -> jax.Array:
  """Kernelised attention from non-negative features.

  Query ``i`` weighs key ``j`` by ``phi_q[i] . phi_k[j] * exp(k_log_scale[j])``. The
  per-key log scale lets a feature map keep each key's features in ``[0, 1]`` and carry
  its magnitude separately (FAVOR+ at large scales): it is applied relative to a running
  maximum over the keys each query sees (the keys up to it when ``causal``), so no
  ``exp`` overflows, the key with the largest scale keeps weight 1, and no later key
  shifts an earlier output.

  Args:
    phi_q, phi_k: ``[batch, length, heads, features]`` feature maps of queries and keys.
    v: ``[batch, length, heads, head_dim_v]``.
    mask: optional ``[batch, length]`` bool; padded keys are removed.
    causal: prefix sums, in chunks of ``chunk_size``.
    k_log_scale: optional ``[batch, length, heads]`` per-key log weight (default 0).

  Returns:
    ``[batch, length, heads, head_dim_v]`` float32; zero where the denominator is zero
    (or below ``TINY = 1e-30``, whose reciprocal float32 cannot hold).
  """
  phi_q, phi_k, v = phi_q.astype(f32), phi_k.astype(f32), v.astype(f32)
  if mask is not None:
    phi_k = phi_k * mask[:, :, None, None]
  if k_log_scale is not None:
    k_log_scale = k_log_scale.astype(f32)
    if mask is not None:
      k_log_scale = jnp.where(mask[:, :, None], k_log_scale, NEG)
  if not causal:
    if k_log_scale is not None:
      # One shift per (example, head): it cancels between numerator and denominator.
      top = jax.lax.stop_gradient(jnp.max(k_log_scale, axis=1, keepdims=True))
      phi_k = phi_k * jnp.exp(k_log_scale - top)[..., None]
    state = jnp.einsum("blhm,blhd->bhmd", phi_k, v)
    norm = jnp.sum(phi_k, axis=1)                             # [b, h, m]
    num = jnp.einsum("blhm,bhmd->blhd", phi_q, state)
    den = jnp.einsum("blhm,bhm->blh", phi_q, norm)
  else:
    num, den = _causal_prefix(phi_q, phi_k, v, k_log_scale, chunk_size)
  # A denominator below TINY (only reached by extreme inputs) is treated as zero: its
  # reciprocal would overflow float32.
  live = den > TINY
  safe = jnp.where(live, den, 1.0)
  # The backward pass of num / den squares den, which overflows float32 once den is
  # below ~1e-19 (large inputs make it so). Scaling both by the constant 1 / den first
  # keeps the value and the exact gradients, with no square of a tiny number.
  inv = jax.lax.stop_gradient(1.0 / safe)
  out = (num * inv[..., None]) / (safe * inv)[..., None]
  return jnp.where(live[..., None], out, 0.0)


def _causal_prefix(phi_q, phi_k, v, log_scale, chunk_size):
  b, length, h, m = phi_q.shape
  dv = v.shape[-1]
  c = min(chunk_size, length)

  def chunks(x, fill=0.0):  # [b, l, ...] -> [n, b, c, ...]
    x = pad_axis(x, c, axis=1, value=fill)
    return jnp.moveaxis(x.reshape(b, -1, c, *x.shape[2:]), 1, 0)

  tril = jnp.tril(jnp.ones((c, c), bool))

  @jax.checkpoint  # keep only the running state per chunk for the backward pass
  def step(carry, xs):
    state, norm, top = carry            # top [b, h]: largest log scale of the keys so far
    qc, kc, vc, ac = xs                 # ac [b, c, h]: log scales of this chunk's keys
    scores = jnp.where(tril, jnp.einsum("bqhm,bkhm->bhqk", qc, kc), 0.0)
    past_num = jnp.einsum("bqhm,bhmd->bqhd", qc, state)
    past_den = jnp.einsum("bqhm,bhm->bqh", qc, norm)
    if log_scale is not None:
      # Query i's shift: the largest log scale among keys <= i. It cancels in num / den,
      # so it is a constant for the backward pass; every exponent below is <= 0.
      shift = jax.lax.stop_gradient(
          jnp.maximum(top[:, None, :], jax.lax.cummax(ac, axis=1)))    # [b, c, h]
      rel = jnp.einsum("bkh->bhk", ac)[:, :, None, :] - jnp.einsum("bqh->bhq", shift)[..., None]
      scores = jnp.where(tril, scores * jnp.exp(jnp.where(tril, rel, 0.0)), 0.0)
      carried = jnp.exp(top[:, None, :] - shift)                       # [b, c, h]
      past_num, past_den = past_num * carried[..., None], past_den * carried
      new_top = shift[:, -1]
      decay = jnp.exp(top - new_top)                                   # [b, h]
      state, norm = state * decay[..., None, None], norm * decay[..., None]
      kc = kc * jnp.exp(ac - new_top[:, None, :])[..., None]
      top = new_top
    num = jnp.einsum("bhqk,bkhd->bqhd", scores, vc) + past_num
    den = jnp.swapaxes(jnp.sum(scores, axis=-1), 1, 2) + past_den
    state = state + jnp.einsum("bkhm,bkhd->bhmd", kc, vc)
    norm = norm + jnp.sum(kc, axis=1)
    return (state, norm, top), (num, den)

  ac = jnp.zeros((b, length, h), f32) if log_scale is None else log_scale
  init = (jnp.zeros((b, h, m, dv), f32), jnp.zeros((b, h, m), f32), jnp.full((b, h), NEG, f32))
  _, (num, den) = jax.lax.scan(
      step, init, (chunks(phi_q), chunks(phi_k), chunks(v), chunks(ac, fill=NEG)))
  num = jnp.moveaxis(num, 0, 1).reshape(b, -1, h, dv)[:, :length]
  den = jnp.moveaxis(den, 0, 1).reshape(b, -1, h)[:, :length]
  return num, den


def elu_features(x: jax.Array) -> jax.Array:
  """``phi(x) = elu(x) + 1``, positive everywhere."""
  return jax.nn.elu(x.astype(f32)) + 1.0


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                     causal: bool = False, chunk_size: int = 128) -> jax.Array:
  """Linear transformer attention with ``phi(x) = elu(x) + 1``.

  Args:
    q, k: ``[batch, length, heads, head_dim]``; v: ``[batch, length, heads, head_dim_v]``.
    mask: optional ``[batch, length]`` padding mask (True = real token).
    causal: cumulative sums (chunked by ``chunk_size``).

  Returns:
    ``[batch, length, heads, head_dim_v]`` in ``q``'s dtype; zeros at padded queries.
  """
  mask = check_qkv("linear", q, k, v, mask)
  check_positive("linear", "chunk_size", chunk_size)
  out = feature_attention(elu_features(q), elu_features(k), v, mask=mask, causal=causal,
                          chunk_size=chunk_size)
  return zero_padded_queries(out.astype(q.dtype), mask)


@register("linear")
class LinearAttention(Family):
  """Linear transformer, ``phi(x) = elu(x) + 1``.

  Attributes:
    chunk_size: chunk length of the causal prefix sums (default 128).
  """

  decodable = True

  chunk_size: int = 128

  def check_options(self):
    check_positive("linear", "chunk_size", self.chunk_size)

  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    del deterministic
    return linear_attention(q, k, v, mask=mask, causal=self.causal, chunk_size=self.chunk_size)

  def decode_init(self, batch, heads, head_dim, head_dim_v, capacity, dtype=jnp.float32):
    """Running sums over ``head_dim`` features: the same size at any context length."""
    del capacity, dtype
    return decoding.sums_init(batch, heads, head_dim, head_dim_v)

  def decode_step(self, q, k, v, state, position, valid):
    del position
    out, state = decoding.sums_step(elu_features(q), elu_features(k), v, state, valid)
    return out.astype(q.dtype), state

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

from effx.attention.base import Family, check_positive, check_qkv, zero_padded_queries
from effx.attention.core import pad_axis
from effx.attention.registry import register

f32 = jnp.float32


def feature_attention(phi_q: jax.Array, phi_k: jax.Array, v: jax.Array, *,
                      mask: jax.Array | None = None, causal: bool = False,
                      chunk_size: int = 128) -> jax.Array:
  """Kernelised attention from non-negative features.

  Args:
    phi_q, phi_k: ``[batch, length, heads, features]`` feature maps of queries and keys.
    v: ``[batch, length, heads, head_dim_v]``.
    mask: optional ``[batch, length]`` bool; padded keys are removed.
    causal: prefix sums, in chunks of ``chunk_size``.

  Returns:
    ``[batch, length, heads, head_dim_v]`` float32; zero where the denominator is zero.
  """
  phi_q, phi_k, v = phi_q.astype(f32), phi_k.astype(f32), v.astype(f32)
  if mask is not None:
    phi_k = phi_k * mask[:, :, None, None]
  if not causal:
    state = jnp.einsum("blhm,blhd->bhmd", phi_k, v)
    norm = jnp.sum(phi_k, axis=1)                             # [b, h, m]
    num = jnp.einsum("blhm,bhmd->blhd", phi_q, state)
    den = jnp.einsum("blhm,bhm->blh", phi_q, norm)
  else:
    num, den = _causal_prefix(phi_q, phi_k, v, chunk_size)
  safe = jnp.where(den > 0, den, 1.0)
  return jnp.where((den > 0)[..., None], num / safe[..., None], 0.0)


def _causal_prefix(phi_q, phi_k, v, chunk_size):
  b, length, h, m = phi_q.shape
  dv = v.shape[-1]
  c = min(chunk_size, length)

  def chunks(x):  # [b, l, ...] -> [n, b, c, ...]
    x = pad_axis(x, c, axis=1)
    return jnp.moveaxis(x.reshape(b, -1, c, *x.shape[2:]), 1, 0)

  tril = jnp.tril(jnp.ones((c, c), bool))

  @jax.checkpoint  # keep only the running state per chunk for the backward pass
  def step(carry, xs):
    state, norm = carry
    qc, kc, vc = xs
    scores = jnp.where(tril, jnp.einsum("bqhm,bkhm->bhqk", qc, kc), 0.0)
    num = jnp.einsum("bhqk,bkhd->bqhd", scores, vc) + jnp.einsum("bqhm,bhmd->bqhd", qc, state)
    den = jnp.swapaxes(jnp.sum(scores, axis=-1), 1, 2) + jnp.einsum("bqhm,bhm->bqh", qc, norm)
    state = state + jnp.einsum("bkhm,bkhd->bhmd", kc, vc)
    norm = norm + jnp.sum(kc, axis=1)
    return (state, norm), (num, den)

  init = (jnp.zeros((b, h, m, dv), f32), jnp.zeros((b, h, m), f32))
  _, (num, den) = jax.lax.scan(step, init, (chunks(phi_q), chunks(phi_k), chunks(v)))
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

  chunk_size: int = 128

  def check_options(self):
    check_positive("linear", "chunk_size", self.chunk_size)

  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    del deterministic
    return linear_attention(q, k, v, mask=mask, causal=self.causal, chunk_size=self.chunk_size)

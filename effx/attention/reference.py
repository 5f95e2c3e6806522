"""The dense float32 oracle every attention family is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reference(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
              causal: bool = False, pattern: jax.Array | None = None,
              scale: float | None = None) -> jax.Array:
  """Plain softmax attention in float32 with an explicit boolean allow-matrix.

  Query ``i`` attends key ``j`` iff ``mask[b, j]`` (key is real), ``j <= i`` when
  ``causal``, and ``pattern[..., i, j]``. A query with no allowed key, and every padded
  query (``mask[b, i]`` False), outputs zeros.

  Args:
    q, k: ``[batch, length, heads, head_dim]``.
    v: ``[batch, length, heads, head_dim_v]``.
    mask: optional ``[batch, length]`` padding mask, True = real token.
    causal: forbid attending to later positions.
    pattern: optional boolean allow-matrix broadcastable to
      ``[batch, heads, length, length]`` (so ``[length, length]``,
      ``[heads, length, length]`` or ``[batch, heads, length, length]``).
    scale: logit scale, default ``head_dim ** -0.5``.

  Returns:
    ``[batch, length, heads, head_dim_v]`` float32.
  """
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  length = q.shape[1]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
  allowed = jnp.ones((1, 1, length, length), bool)
  if mask is not None:
    allowed = allowed & mask.astype(bool)[:, None, None, :]
  if causal:
    allowed = allowed & jnp.tril(jnp.ones((length, length), bool))
  if pattern is not None:
    allowed = allowed & jnp.asarray(pattern, bool)
  logits = jnp.where(allowed, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.where(allowed, jnp.exp(logits - row_max), 0.0)
  denom = weights.sum(-1, keepdims=True)
  weights = weights / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
  if mask is not None:
    out = out * mask.astype(out.dtype)[:, :, None, None]
  return out

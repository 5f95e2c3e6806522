"""One step of causal attention for incremental decoding, from a per-layer state.

A decodable family (``Family.decodable``) gives ``decode_init(batch, heads, head_dim,
head_dim_v, capacity)`` (its state before the first token, for sequences of up to
``capacity`` tokens) and ``decode_step(q, k, v, state, position, valid)``: the new token's
projected heads ``[batch, heads, dim]`` at integer ``position [batch]`` (``valid [batch]``
False for a padding token, which no later query sees) -> ``(out [batch, heads, dim_v],
new state)``. Its output equals the family's causal forward at that position. Two kinds:

* **Key caches** (softmax families): the keys and values a query may see, with their
  positions. ``dense`` and ``blockwise`` keep every earlier token (``capacity`` slots:
  memory and time per token grow with the context); ``local`` and ``dilated`` keep a ring
  buffer of the last ``window * dilation + 1`` tokens (constant per token), and
  ``adaptive_span`` one of ``max_span + 1`` (weighted by each head's ramp); ``sparse``
  and ``longformer`` keep every earlier token and apply their pattern to the row (exact,
  but as costly per token as dense: their strided / global keys reach back to the start).
* **Running sums** (kernel families: ``linear``, ``performer``, ``cosformer``): the
  prefix sums ``S = sum_j phi(k_j) v_j^T`` and ``z = sum_j phi(k_j)`` (``[heads, features,
  dim_v]`` per sequence, whatever the context length), with the running maximum of the
  keys' log scales where the feature map has them (Performer).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from effx.attention.core import NEG

f32 = jnp.float32
TINY = 1e-30  # as effx.attention.linear: a smaller denominator counts as zero


def cache_init(batch: int, slots: int, heads: int, head_dim: int, head_dim_v: int,
               dtype=jnp.float32) -> dict[str, jax.Array]:
  """An empty key cache of ``slots`` entries (``position`` -1: empty); keys and values
  are stored ``[batch, heads, slots, dim]``, the layout both products read without a
  transpose."""
  return {"k": jnp.zeros((batch, heads, slots, head_dim), dtype),
          "v": jnp.zeros((batch, heads, slots, head_dim_v), dtype),
          "position": jnp.full((batch, slots), -1, jnp.int32)}


def cache_step(q: jax.Array, k: jax.Array, v: jax.Array, state: dict[str, jax.Array],
               position: jax.Array, valid: jax.Array,
               allow: Callable[[jax.Array], jax.Array],
               weight: Callable[[jax.Array, jax.Array], jax.Array] | None = None
               ) -> tuple[jax.Array, dict]:
  """Writes the token into slot ``position % slots``, then softmax attention of ``q``
  over the cached keys that ``allow`` admits (the weights multiplied by ``weight`` and
  renormalised, when given).

  Args:
    q, k: ``[batch, heads, head_dim]``; v: ``[batch, heads, head_dim_v]``.
    state: from ``cache_init``.
    position, valid: ``[batch]``.
    allow: ``(query_position [batch, 1], key_position [batch, slots]) -> bool
      [batch, heads or 1, slots]``: the family's pattern along one row (called only
      where ``key_position <= query_position``).
    weight: optional, the same arguments -> float ``[batch, heads or 1, slots]``
      multiplying each allowed key's softmax weight (adaptive span's ramp).

  Returns:
    ``(out [batch, heads, head_dim_v] in q's dtype (zeros where not valid), state)``.
  """
  slots = state["k"].shape[2]
  row = jnp.arange(q.shape[0])
  slot = position % slots
  keys = state["k"].at[row, :, slot].set(k.astype(state["k"].dtype))
  values = state["v"].at[row, :, slot].set(v.astype(state["v"].dtype))
  stored = state["position"].at[row, slot].set(jnp.where(valid, position, -1))
  distance = position[:, None] - stored
  allowed = (stored >= 0) & (distance >= 0)
  allowed = allowed[:, None, :] & allow(position[:, None], stored)       # [b, h, slots]
  logits = jnp.einsum("bhd,bhsd->bhs", q, keys,
                      preferred_element_type=f32) * q.shape[-1] ** -0.5
  if weight is not None:
    # m e^s / sum m e^s as a softmax of s + log m: keys of weight 0 stay out of its max.
    w = jnp.where(allowed, weight(position[:, None], stored), 0.0)
    allowed = allowed & (w > 0)
    logits = logits + jnp.log(jnp.where(allowed, w, 1.0))
  weights = jax.nn.softmax(jnp.where(allowed, logits, NEG), axis=-1)
  out = jnp.einsum("bhs,bhsd->bhd", weights, values, preferred_element_type=f32)
  out = jnp.where(valid[:, None, None], out, 0.0).astype(q.dtype)
  return out, {"k": keys, "v": values, "position": stored}


def sums_init(batch: int, heads: int, features: int, head_dim_v: int) -> dict[str, jax.Array]:
  """Empty running sums (``top``: the largest key log scale so far, NEG before any)."""
  return {"S": jnp.zeros((batch, heads, features, head_dim_v), f32),
          "z": jnp.zeros((batch, heads, features), f32),
          "top": jnp.full((batch, heads), NEG, f32)}


def sums_step(phi_q: jax.Array, phi_k: jax.Array, v: jax.Array, state: dict[str, jax.Array],
              valid: jax.Array, log_scale: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Adds the token's key to the running sums, then reads them with its query.

  ``phi_q, phi_k [batch, heads, features]``, ``v [batch, heads, head_dim_v]``, ``valid
  [batch]``, ``log_scale [batch, heads]`` (the key's magnitude, kept apart from its
  features as ``effx.attention.linear.feature_attention`` does). Returns ``(out [batch,
  heads, head_dim_v] float32, state)``; zero where the denominator is below ``TINY`` or
  the token is padding.
  """
  phi_q, phi_k, v = phi_q.astype(f32), phi_k.astype(f32), v.astype(f32)
  phi_k = phi_k * valid[:, None, None]
  scale = jnp.zeros(phi_k.shape[:2], f32) if log_scale is None else log_scale.astype(f32)
  scale = jnp.where(valid[:, None], scale, NEG)
  top = jnp.maximum(state["top"], scale)
  decay, weight = jnp.exp(state["top"] - top), jnp.exp(scale - top)      # [b, h]
  kw = phi_k * weight[..., None]
  S = state["S"] * decay[..., None, None] + jnp.einsum("bhm,bhd->bhmd", kw, v)
  z = state["z"] * decay[..., None] + kw
  num = jnp.einsum("bhm,bhmd->bhd", phi_q, S)
  den = jnp.einsum("bhm,bhm->bh", phi_q, z)
  live = (den > TINY) & valid[:, None]
  out = jnp.where(live[..., None], num / jnp.where(live, den, 1.0)[..., None], 0.0)
  return out, {"S": S, "z": z, "top": top}

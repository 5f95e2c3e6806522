"""Rotary position embedding (Su et al. 2021), applied to queries and keys inside
``SelfAttention`` (``positional="rotary"``); ``effx.layers.positional`` lists it beside
the absolute encodings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def apply_rotary(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
  """Rotates pairs of features of ``x [batch, length, heads, head_dim]`` by angles
  ``position * base^(-2i / head_dim)``; ``positions`` is ``[batch, length]``. An odd last
  feature is left as is."""
  d = x.shape[-1] - x.shape[-1] % 2
  inv_freq = base ** (-np.arange(0, d, 2) / d)
  angles = positions[:, :, None, None].astype(jnp.float32) * inv_freq  # [b, l, 1, d/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x.astype(jnp.float32)
  even, odd = x32[..., 0:d:2], x32[..., 1:d:2]
  rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
  rotated = rotated.reshape(*x.shape[:-1], d)
  return jnp.concatenate([rotated, x32[..., d:]], axis=-1).astype(x.dtype)

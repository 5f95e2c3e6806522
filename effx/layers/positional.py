"""Positional encodings: learned absolute, sinusoidal, rotary, and Shortformer's
position-infused attention.

``learned`` and ``sinusoidal`` are added to the token embeddings once. ``rotary``
(Su et al., 2021) rotates queries and keys inside every attention layer by their
positions. ``shortformer`` (Press et al., 2021, position-infused attention) adds
sinusoidal position embeddings to the inputs of the query and key projections of every
attention layer, never to the values or the residual stream.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effx.attention.rotary import apply_rotary  # noqa: F401 (positions, in one place)
from effx.common import axes

KINDS = ("learned", "sinusoidal", "rotary", "shortformer", "none")


def sinusoidal(positions: jax.Array, dim: int, max_timescale: float = 10_000.0) -> jax.Array:
  """Vaswani et al.'s sinusoids ``[..., dim]`` for integer ``positions [...]``."""
  half = dim // 2
  freqs = np.exp(-np.log(max_timescale) * np.arange(half) / max(half - 1, 1))
  angles = positions[..., None].astype(jnp.float32) * freqs
  table = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return jnp.pad(table, [(0, 0)] * (table.ndim - 1) + [(0, dim - 2 * half)])


class AbsolutePositions(nn.Module):
  """``learned`` (a ``[max_len, dim]`` table) or ``sinusoidal`` embeddings of positions.

  Returns ``[batch, length, dim]`` for integer ``positions [batch, length]``; positions
  must lie in ``[0, max_len)``.
  """

  kind: str
  max_len: int
  dim: int
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, positions: jax.Array) -> jax.Array:
    if self.kind == "sinusoidal":
      return sinusoidal(positions, self.dim)
    table = self.param("pos_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, axes.EMBED)), (self.max_len, self.dim),
                       self.param_dtype)
    return jnp.take(table, positions, axis=0)

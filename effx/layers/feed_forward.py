"""Position-wise feed-forward layer, optionally applied over length chunks.

Chunking (Reformer, Kitaev et al. 2020, Sec. 3) bounds the ``[batch, length, mlp_dim]``
hidden activation: a ``lax.scan`` over chunks of ``chunk_size`` positions applies the
same MLP to each chunk, and each chunk is rematerialised, so forward and backward hold
one chunk's hidden activation at a time. The parameters, outputs and gradients are those
of the unchunked layer (dropout masks are drawn per chunk, so with dropout on the two
agree in distribution, not bitwise).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from effx.attention.core import pad_axis
from effx.common import axes


class Mlp(nn.Module):
  """``Dense(mlp_dim) -> activation -> dropout -> Dense(out_dim)`` on the last axis."""

  mlp_dim: int
  out_dim: int
  dropout_rate: float = 0.0
  activation: Callable = nn.gelu
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True):
    init = nn.initializers.lecun_normal()
    h = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="wi",
                 kernel_init=nn.with_logical_partitioning(init, (axes.EMBED, axes.MLP)),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.MLP,)))(x)
    h = nn.with_logical_constraint(self.activation(h), (axes.BATCH, axes.LENGTH, axes.MLP))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="wo",
                    kernel_init=nn.with_logical_partitioning(init, (axes.MLP, axes.EMBED)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                           (axes.EMBED,)))(h)


class FeedForward(nn.Module):
  """MLP over ``[batch, length, features]``, chunked along length when ``chunk_size``.

  Attributes:
    mlp_dim: hidden width.
    out_dim: output width (default: input width).
    dropout_rate: dropout on the hidden activation.
    chunk_size: positions per chunk; None applies the MLP to the whole sequence. Lengths
      that are not a multiple are padded internally (the MLP is position-wise).
    activation, dtype, param_dtype: as for ``Mlp``.
  """

  mlp_dim: int
  out_dim: int | None = None
  dropout_rate: float = 0.0
  chunk_size: int | None = None
  activation: Callable = nn.gelu
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.chunk_size is not None and (not isinstance(self.chunk_size, int)
                                        or self.chunk_size <= 0):
      raise ValueError(f"FeedForward: ff_chunk_size={self.chunk_size!r} must be a positive "
                       "integer or None")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    kwargs = dict(mlp_dim=self.mlp_dim, out_dim=self.out_dim or x.shape[-1],
                  dropout_rate=self.dropout_rate, activation=self.activation, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    length = x.shape[1]
    if self.chunk_size is None or self.chunk_size >= length:
      return Mlp(name="mlp", **kwargs)(x, deterministic)
    chunks = pad_axis(x, self.chunk_size, axis=1)
    chunks = chunks.reshape(x.shape[0], -1, self.chunk_size, x.shape[-1]).swapaxes(0, 1)

    def body(mlp, carry, chunk):
      return carry, mlp(chunk, deterministic)

    scan = nn.scan(nn.remat(body), variable_broadcast="params",
                   split_rngs={"params": False, "dropout": True})
    _, out = scan(Mlp(name="mlp", **kwargs), None, chunks)  # [n, b, chunk, out]
    out = out.swapaxes(0, 1).reshape(x.shape[0], -1, out.shape[-1])
    return out[:, :length]

"""``SelfAttention``: the one module that owns projections, masking, dropout and sharding
annotations; the attention family only mixes the projected heads."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from effx.attention import registry
from effx.attention.rotary import apply_rotary
from effx.common import axes

HEAD_AXES = (axes.BATCH, axes.LENGTH, axes.HEADS, axes.KV)


class SelfAttention(nn.Module):
  """Multi-head self-attention with a pluggable attention family.

  Families that add no parameters give exactly the parameter tree of
  ``attention="dense"`` (``query``, ``key``, ``value``, ``out``), so a trained dense
  model's weights load into any of them unchanged. Families with parameters (Linformer's
  ``E, F``, Synthesizer, Sinkhorn's sorting network) keep them under ``mixer``; Routing
  keeps its centroids in the ``"state"`` collection.

  Attributes:
    num_heads: number of heads.
    qkv_features: total width of queries/keys/values (divisible by ``num_heads``).
    out_features: output width (default: the input width).
    attention: registered family name (``effx.attention.names()``).
    attention_kwargs: the family's options, e.g. ``{"window": 128}``.
    causal: forbid attending to later positions (families that cannot raise).
    dropout_rate: dropout on the mixed heads before the output projection.
    dtype: computation dtype of the projections (families compute softmax statistics
      in float32 and return this dtype).
    param_dtype: parameter dtype (also passed to families that have parameters).
    kernel_init: initializer of the projection kernels.
    use_bias: projections with biases.
    rotary: rotate queries and keys by their positions (rotary embeddings).
    implementation: the family's backend, ``"auto"`` (default: the fastest the device
      and input allow) or one of ``effx.attention.backends(attention)``; a family that
      lacks it fails here, naming the ones it has.
  """

  num_heads: int
  qkv_features: int
  out_features: int | None = None
  attention: str = "dense"
  attention_kwargs: Mapping[str, Any] | None = None
  causal: bool = False
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  use_bias: bool = True
  rotary: bool = False
  implementation: str = "auto"

  def __post_init__(self):
    if not isinstance(self.num_heads, int) or self.num_heads <= 0:
      raise ValueError(f"SelfAttention: num_heads={self.num_heads!r} must be a positive integer")
    if self.qkv_features % self.num_heads:
      raise ValueError(f"SelfAttention: qkv_features={self.qkv_features} is not divisible by "
                       f"num_heads={self.num_heads}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"SelfAttention: dropout_rate={self.dropout_rate} must be in [0, 1)")
    # Build the family once, unattached, so a bad name or option fails here.
    registry.make(self.attention, causal=self.causal, parent=None, **self._family_options())
    super().__post_init__()

  def _family_options(self) -> dict[str, Any]:
    options = dict(self.attention_kwargs or {})
    if self.implementation != "auto":
      given = options.setdefault("implementation", self.implementation)
      if given != self.implementation:
        raise ValueError(f"SelfAttention: implementation={self.implementation!r} and "
                         f"attention_kwargs implementation={given!r} disagree; give one")
    if "param_dtype" in registry.options(self.attention):
      options.setdefault("param_dtype", self.param_dtype)
    return options

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               deterministic: bool = True, *, qk_input: jax.Array | None = None,
               positions: jax.Array | None = None, cache: dict | None = None):
    """Attends ``x [batch, length, features]`` to itself.

    Args:
      x: inputs.
      mask: optional ``[batch, length]`` padding mask, True = real token.
      deterministic: disables dropout and any training-time randomness of the family.
      qk_input: optional ``[batch, length, features]`` fed to the query and key
        projections instead of ``x`` (values still see ``x``): Shortformer's
        position-infused attention passes ``x + position_embeddings``.
      positions: ``[batch, length]`` integer positions for ``rotary`` (default
        ``0..length-1``).
      cache: incremental decoding (causal, decodable families): ``x`` is one token
        ``[batch, 1, features]`` at ``positions [batch, 1]`` and ``cache`` the family's
        state (``decode_init``); returns ``(out, new_cache)``.

    Returns:
      ``[batch, length, out_features]`` (and the new cache when decoding).
    """
    if x.ndim != 3:
      raise ValueError(f"SelfAttention: x must be [batch, length, features], got {x.shape}")
    if qk_input is not None and qk_input.shape != x.shape:
      raise ValueError(f"SelfAttention: qk_input has shape {qk_input.shape}, x has {x.shape}")
    head_dim = self.qkv_features // self.num_heads
    project = functools.partial(
        _Projection, features=(self.num_heads, head_dim), contract=1, dtype=self.dtype,
        param_dtype=self.param_dtype, use_bias=self.use_bias, kernel_init=self.kernel_init,
        kernel_axes=(axes.EMBED, axes.HEADS, axes.KV), bias_axes=(axes.HEADS, axes.KV))
    qk_x = x if qk_input is None else qk_input
    q, k, v = (nn.with_logical_constraint(project(name=n)(inp), HEAD_AXES)
               for n, inp in (("query", qk_x), ("key", qk_x), ("value", x)))  # [b, l, h, d]
    if self.rotary:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
      q, k = apply_rotary(q, positions), apply_rotary(k, positions)
    # Kept only when a caller makes "intermediates" mutable (distillation's relation
    # losses read them); otherwise a no-op.
    self.sow("intermediates", "qkv", {"q": q, "k": k, "v": v})
    mixer = registry.make(self.attention, causal=self.causal, module_name="mixer",
                          **self._family_options())
    if cache is not None:
      if not (self.causal and mixer.decodable) or x.shape[1] != 1 or positions is None:
        raise ValueError("SelfAttention: a decoding cache needs causal=True, a decodable "
                         "family and one token [batch, 1, features] with its positions")
      valid = jnp.ones(x.shape[:1], bool) if mask is None else mask[:, 0]
      mixed, cache = mixer.decode_step(q[:, 0], k[:, 0], v[:, 0], cache, positions[:, 0],
                                       valid)
      mixed = mixed[:, None]
    else:
      mixed = mixer(q, k, v, mask=mask, deterministic=deterministic)
    mixed = nn.with_logical_constraint(mixed, HEAD_AXES)
    mixed = nn.Dropout(self.dropout_rate)(mixed, deterministic=deterministic)
    out = _Projection(
        features=(self.out_features or x.shape[-1],), contract=2, dtype=self.dtype,
        param_dtype=self.param_dtype, use_bias=self.use_bias, kernel_init=self.kernel_init,
        kernel_axes=(axes.HEADS, axes.KV, axes.EMBED), bias_axes=(axes.EMBED,),
        name="out")(mixed)
    return out if cache is None else (out, cache)


class _Projection(nn.Module):
  """``nn.DenseGeneral`` over the last ``contract`` axes, with the same parameter names,
  shapes and initial values, but sharding-annotated at its real shape: DenseGeneral
  initialises a flattened kernel and applies the logical constraint to that, which fails
  under a device mesh for kernels of rank > 2."""

  features: tuple[int, ...]
  contract: int
  kernel_axes: tuple[str, ...]
  bias_axes: tuple[str, ...]
  kernel_init: Any
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[x.ndim - self.contract:]
    shape = (*in_shape, *self.features)

    def init(key, shape, dtype):  # initialise as the flat matrix DenseGeneral would
      flat = (math.prod(in_shape), math.prod(self.features))
      return self.kernel_init(key, flat, dtype).reshape(shape)

    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                        shape, self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    batch_dims = x.ndim - self.contract
    y = jax.lax.dot_general(x, kernel, ((tuple(range(batch_dims, x.ndim)),
                                         tuple(range(self.contract))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             self.bias_axes),
                        self.features, self.param_dtype)
      y = y + jnp.asarray(bias, y.dtype)
    return y

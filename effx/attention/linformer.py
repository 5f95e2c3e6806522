"""Linformer attention (Wang et al., 2020): keys and values projected along the length.

``softmax(Q (E K)^T / sqrt(d)) (F V)`` with learned ``E, F`` of shape
``[k, max_len]`` (sliced to the input length): O(length * k). Sharing, as in the paper:
``"none"`` (per-head ``E_h, F_h``), ``"headwise"`` (one ``E``, one ``F`` for all heads) or
``"kv"`` (one matrix for both, all heads). Layer-wise sharing would be a parameter shared
across layers, which a single module cannot express.

Padding: padded keys and values are zeroed before the projection, so they contribute
nothing; the projected rows are not masked (each mixes many positions). With
``E = F = I`` and ``k = length`` this is exact attention over the zeroed keys and values.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from effx.attention.base import Family, check_choice, check_positive, check_qkv, zero_padded_queries
from effx.attention.core import attention_from_logits
from effx.attention.registry import register

SHARING = ("none", "headwise", "kv")


@register("linformer")
class LinformerAttention(Family):
  """Low-rank projection of keys and values along the sequence; bidirectional only.

  Attributes:
    k: projected length (default 256).
    share: ``"none"`` | ``"headwise"`` (default) | ``"kv"``.
    max_len: longest supported input; ``E`` and ``F`` have ``max_len`` columns
      (default 4096).
    param_dtype: dtype of ``E`` and ``F``.
  """

  k: int = 256
  share: str = "headwise"
  max_len: int = 4096
  param_dtype: jnp.dtype = jnp.float32

  supports_causal = False

  def check_options(self):
    check_positive("linformer", "k", self.k)
    check_choice("linformer", "share", self.share, SHARING)
    check_positive("linformer", "max_len", self.max_len)

  @nn.compact
  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    del deterministic
    mask = check_qkv("linformer", q, k, v, mask)
    b, length, heads, d = q.shape
    if length > self.max_len:
      raise ValueError(f"linformer: input length {length} exceeds option max_len={self.max_len}")
    shape = (heads, self.k, self.max_len) if self.share == "none" else (self.k, self.max_len)
    axes = ("heads", None, None) if self.share == "none" else (None, None)
    # JL-style init N(0, 1/k): E^T E is the identity in expectation.
    init = nn.with_logical_partitioning(nn.initializers.normal(self.k ** -0.5), axes)
    proj_k = self.param("E", init, shape, self.param_dtype)
    proj_v = proj_k if self.share == "kv" else self.param("F", init, shape, self.param_dtype)
    if mask is not None:
      keep = mask[:, :, None, None].astype(k.dtype)
      k, v = k * keep, v * keep
    spec = "hkl,blhd->bkhd" if self.share == "none" else "kl,blhd->bkhd"
    k_low = jnp.einsum(spec, proj_k[..., :length].astype(jnp.float32), k.astype(jnp.float32))
    v_low = jnp.einsum(spec, proj_v[..., :length].astype(jnp.float32), v.astype(jnp.float32))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k_low) * d ** -0.5
    out, _ = attention_from_logits(logits, v_low, jnp.ones((), bool))
    return zero_padded_queries(out.astype(q.dtype), mask)

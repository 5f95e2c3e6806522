"""Synthesizer attention (Tay et al., 2021): attention weights not from query-key dot
products.

* ``"dense"``: each position synthesises its row of logits with a two-layer MLP,
  ``B_i = W2 relu(W1 x_i + b1) + b2`` (per head). The family sees already-projected
  heads, so ``x_i`` is the head's query vector (a learned linear map of the layer input).
* ``"random"``: a learned ``[max_len, max_len]`` logit matrix per head, independent of the
  input.
* ``"factorized_random"``: ``R = R1 R2^T`` with ``R1, R2`` of shape ``[max_len, rank]``;
  computed with the chunked exact kernel, so memory is O(length * chunk) and the
  ``[length, length]`` matrix is never materialised.

All modes mask padded keys and, when causal, later positions; the weights then multiply
the values as in ordinary attention. ``"dense"`` and ``"random"`` are quadratic in length.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from effx.attention import kernel
from effx.attention.base import Family, check_choice, check_positive, check_qkv, zero_padded_queries
from effx.attention.core import attention_from_logits, positions
from effx.attention.registry import register

MODES = ("dense", "random", "factorized_random")


@register("synthesizer")
class SynthesizerAttention(Family):
  """Dense / random / factorized-random Synthesizer.

  Attributes:
    mode: ``"dense"`` (default) | ``"random"`` | ``"factorized_random"``.
    max_len: longest supported input (default 1024).
    rank: ``R1, R2`` width for ``"factorized_random"`` (default 8).
    hidden: hidden width of the dense synthesiser MLP (default: head_dim).
    param_dtype: dtype of the synthesiser's parameters.
  """

  backends = kernel.BACKENDS  # pallas, splash: mode='factorized_random' only

  derived_defaults = {"hidden": "head_dim"}

  mode: str = "dense"
  max_len: int = 1024
  rank: int = 8
  hidden: int | None = None
  param_dtype: jnp.dtype = jnp.float32

  def check_options(self):
    check_choice("synthesizer", "mode", self.mode, MODES)
    check_positive("synthesizer", "max_len", self.max_len)
    check_positive("synthesizer", "rank", self.rank)
    check_positive("synthesizer", "hidden", self.hidden, allow_none=True)
    if self.implementation in ("pallas", "splash") and self.mode != "factorized_random":
      raise ValueError(f"synthesizer: implementation={self.implementation!r} runs "
                       f"mode='factorized_random' only (mode={self.mode!r} mixes values "
                       f"with a dense softmax)")

  @nn.compact
  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    del deterministic
    mask = check_qkv("synthesizer", q, k, v, mask)
    b, length, heads, d = q.shape
    if length > self.max_len:
      raise ValueError(
          f"synthesizer: input length {length} exceeds option max_len={self.max_len}")
    pos, valid = positions(b, length, mask)
    if self.mode == "factorized_random":
      init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("heads", None, None))
      r1 = self.param("R1", init, (heads, self.max_len, self.rank), self.param_dtype)
      r2 = self.param("R2", init, (heads, self.max_len, self.rank), self.param_dtype)
      a = jnp.broadcast_to(jnp.swapaxes(r1[:, :length], 0, 1), (b, length, heads, self.rank))
      c = jnp.broadcast_to(jnp.swapaxes(r2[:, :length], 0, 1), (b, length, heads, self.rank))
      block = min(length, 512)
      layout = kernel.Layout.full(length, length, block, block, causal=self.causal)
      out, _ = kernel.attend(a, c, v, layout, q_pos=pos, k_pos=pos, k_valid=valid,
                             causal=self.causal, scale=self.rank ** -0.5,
                             implementation=self.implementation)
      return zero_padded_queries(out.astype(q.dtype), mask)
    if self.mode == "random":
      init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("heads", None, None))
      logits = self.param("R", init, (heads, self.max_len, self.max_len), self.param_dtype)
      logits = logits[None, :, :length, :length]                  # [1, h, l, l]
    else:
      hidden = self.hidden or d
      w1 = self.param("W1", nn.with_logical_partitioning(
          nn.initializers.lecun_normal(batch_axis=(0,)), ("heads", "kv", None)),
          (heads, d, hidden), self.param_dtype)
      b1 = self.param("b1", nn.with_logical_partitioning(nn.initializers.zeros, ("heads", None)),
                      (heads, hidden), self.param_dtype)
      w2 = self.param("W2", nn.with_logical_partitioning(
          nn.initializers.lecun_normal(batch_axis=(0,)), ("heads", None, None)),
          (heads, hidden, self.max_len), self.param_dtype)
      b2 = self.param("b2", nn.with_logical_partitioning(nn.initializers.zeros, ("heads", None)),
                      (heads, self.max_len), self.param_dtype)
      hid = nn.relu(jnp.einsum("blhd,hde->bhle", q.astype(jnp.float32), w1) + b1[:, None])
      logits = jnp.einsum("bhle,hem->bhlm", hid, w2[..., :length]) + b2[:, None, :length]
    allowed = valid[:, None, None, :]
    if self.causal:
      allowed = allowed & jnp.tri(length, dtype=bool)
    out, _ = attention_from_logits(logits, v, allowed)
    return zero_padded_queries(out.astype(q.dtype), mask)

"""Sparse Transformer attention patterns (Child et al., 2019): strided and fixed.

Both patterns are the union of two factorised parts, computed separately and merged by
their log-sum-exp into one exact softmax over the union ("merged" heads in the paper):

* strided: ``A1 = {j : |i - j| < l}`` (the previous ``l - 1`` positions when causal) and
  ``A2 = {j : (i - j) mod l = 0}``.
* fixed: ``A1 = {j : floor(j / l) = floor(i / l)}`` (same block) and
  ``A2 = {j : j mod l >= l - c}`` (the last ``c`` "summary" positions of every block).

With stride ``l`` the cost is O(length * (l + length / l)) time (O(length^1.5) at
``l ~ sqrt(length)``); the ``A2`` parts run through the chunked exact kernel, so memory
stays O(length * chunk).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from effx.attention import flash
from effx.attention.base import (Family, check_choice, check_positive, check_qkv,
                                 zero_padded_queries)
from effx.attention.core import (NotSelf, OtherBlock, from_residues, grouped_attention, merge,
                                 pad_axis, positions, to_residues)
from effx.attention.local import local_parts
from effx.attention.registry import register

PATTERNS = ("strided", "fixed")


def _summary(stride: int, summary: int | None) -> int:
  return max(1, stride // 16) if summary is None else summary


def _strided(q, k, v, mask, causal, stride):
  b, length = q.shape[:2]
  pos, valid = positions(b, length, mask)
  near = local_parts(q, k, v, mask=mask, causal=causal, window=stride - 1)
  out, lse = flash.attend(
      to_residues(q, stride), to_residues(k, stride), to_residues(v, stride),
      q_pos=to_residues(pos, stride), k_pos=to_residues(pos, stride),
      k_valid=to_residues(valid, stride), causal=causal, rule=NotSelf())
  far = (from_residues(out, stride, length), from_residues(lse, stride, length))
  return merge([near, far])


def _fixed(q, k, v, mask, causal, stride, summary):
  b, length, h, _ = q.shape
  _, valid = positions(b, length, mask)
  padded = -(-length // stride) * stride
  pos = jnp.broadcast_to(jnp.arange(padded, dtype=jnp.int32), (b, padded))

  def blocks(x, fill=0):
    x = pad_axis(x, stride, axis=1, value=fill)
    return x.reshape(b, -1, stride, *x.shape[2:])

  qp, kp = blocks(pos)[..., :, None], blocks(pos)[..., None, :]
  allowed = blocks(valid, False)[..., None, :]
  if causal:
    allowed = allowed & (kp <= qp)
  out, lse = grouped_attention(blocks(q), blocks(k), blocks(v), allowed[:, :, None],
                               scale=q.shape[-1] ** -0.5)
  own = (out.reshape(b, padded, h, -1)[:, :length], lse.reshape(b, padded, h)[:, :length])
  idx = np.array([p for p in range(length) if p % stride >= stride - summary], np.int32)
  if idx.size == 0:
    return own
  spos = jnp.broadcast_to(jnp.asarray(idx), (b, idx.size))
  other = flash.attend(q, k[:, idx], v[:, idx], q_pos=pos[:, :length], k_pos=spos,
                       k_valid=valid[:, idx], causal=causal, rule=OtherBlock(stride))
  return merge([own, other])


def sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                     causal: bool = False, pattern: str = "strided", stride: int = 128,
                     summary: int | None = None) -> jax.Array:
  """Sparse Transformer attention.

  Args:
    q, k: ``[batch, length, heads, head_dim]``; v: ``[batch, length, heads, head_dim_v]``.
    mask: optional ``[batch, length]`` padding mask (True = real token).
    causal: keep only ``j <= i`` (the paper's autoregressive setting).
    pattern: ``"strided"`` or ``"fixed"`` (module docstring).
    stride: ``l``, the block length / stride.
    summary: ``c``, summary positions per block for ``"fixed"`` (default ``l // 16``,
      at least 1; the paper used c in {8, 16, 32} with l in {128, 256}).

  Returns:
    ``[batch, length, heads, head_dim_v]`` in ``q``'s dtype; zeros at padded queries.
  """
  mask = check_qkv("sparse", q, k, v, mask)
  _check(pattern, stride, summary)
  if pattern == "strided":
    out, _ = _strided(q, k, v, mask, causal, stride)
  else:
    out, _ = _fixed(q, k, v, mask, causal, stride, _summary(stride, summary))
  return zero_padded_queries(out.astype(q.dtype), mask)


def _check(pattern, stride, summary):
  check_choice("sparse", "pattern", pattern, PATTERNS)
  check_positive("sparse", "stride", stride)
  check_positive("sparse", "summary", summary, allow_none=True)
  if summary is not None and summary > stride:
    raise ValueError(f"sparse: option summary={summary} must be <= stride={stride}")


def sparse_pattern(length: int, pattern: str, stride: int, summary: int | None,
                   causal: bool) -> np.ndarray:
  """``[length, length]`` allow-matrix of the Sparse Transformer pattern."""
  i = np.arange(length)[:, None]
  j = np.arange(length)[None, :]
  if pattern == "strided":
    allowed = (np.abs(i - j) < stride) | ((i - j) % stride == 0)
  else:
    allowed = (i // stride == j // stride) | (j % stride >= stride - _summary(stride, summary))
  return allowed & (j <= i) if causal else allowed


@register("sparse")
class SparseAttention(Family):
  """Sparse Transformer (strided or fixed pattern, merged heads).

  Attributes:
    pattern: ``"strided"`` (default) or ``"fixed"``.
    stride: block length / stride ``l`` (default 128).
    summary: summary positions per block ``c`` for ``"fixed"`` (default ``l // 16``).
  """

  derived_defaults = {"summary": "max(1, stride // 16)"}

  pattern_kind = "static"

  pattern: str = "strided"
  stride: int = 128
  summary: int | None = None

  def check_options(self):
    _check(self.pattern, self.stride, self.summary)

  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    del deterministic
    return sparse_attention(q, k, v, mask=mask, causal=self.causal, pattern=self.pattern,
                            stride=self.stride, summary=self.summary)

  def allow_matrix(self, length: int, num_heads: int = 1) -> np.ndarray:
    return np.broadcast_to(
        sparse_pattern(length, self.pattern, self.stride, self.summary, self.causal),
        (num_heads, length, length))

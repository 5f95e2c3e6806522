"""Sparse Transformer attention patterns (Child et al., 2019): strided and fixed.

Both patterns are the union of two factorised parts, computed separately and merged by
their log-sum-exp into one exact softmax over the union ("merged" heads in the paper):

* strided: ``A1 = {j : |i - j| < l}`` (the previous ``l - 1`` positions when causal) and
  ``A2 = {j : (i - j) mod l = 0}``.
* fixed: ``A1 = {j : floor(j / l) = floor(i / l)}`` (same block) and
  ``A2 = {j : j mod l >= l - c}`` (the last ``c`` "summary" positions of every block).

With stride ``l`` the cost is O(length * (l + length / l)) time (O(length^1.5) at
``l ~ sqrt(length)``); every part runs through the block-sparse kernel (the band, the
block diagonal, and the strided / summary keys gathered into a sequence of their own), so
memory stays O(length * block).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from effx.attention import decoding, kernel
from effx.attention.base import Family, check_choice, check_positive, check_qkv, zero_padded_queries
from effx.attention.core import NotSelf, OtherBlock, from_residues, merge, positions, to_residues
from effx.attention.local import local_parts
from effx.attention.registry import register

PATTERNS = ("strided", "fixed")


def _summary(stride: int, summary: int | None) -> int:
  return max(1, stride // 16) if summary is None else summary


def _full(q, k, v, *, q_pos, k_pos, k_valid, causal, rule=None, same_order=False):
  """The kernel over every key block (causal block skipping only when queries and keys
  are one sequence in one order)."""
  lq, lk = q.shape[1], k.shape[1]
  bq, bk = min(lq, 512), min(lk, 512)
  layout = kernel.Layout.full(lq, lk, bq, bk, causal=causal and same_order)
  return kernel.attend(q, k, v, layout, q_pos=q_pos, k_pos=k_pos, k_valid=k_valid,
                       causal=causal, rule=rule)


def _strided(q, k, v, mask, causal, stride):
  b, length = q.shape[:2]
  pos, valid = positions(b, length, mask)
  near = local_parts(q, k, v, mask=mask, causal=causal, window=stride - 1)
  # Positions within each residue sequence (t for position r + stride * t): causality and
  # NotSelf compare keys of one residue only, which t orders as r + stride * t does, and one
  # row serves every residue sequence of every example (the padding's positions change no
  # real output).
  rpos = positions(1, -(-length // stride), None)[0]
  out, lse = _full(to_residues(q, stride), to_residues(k, stride), to_residues(v, stride),
                   q_pos=rpos, k_pos=rpos, k_valid=to_residues(valid, stride), causal=causal,
                   rule=NotSelf(), same_order=True)
  far = (from_residues(out, stride, length), from_residues(lse, stride, length))
  return merge([near, far])


def _fixed(q, k, v, mask, causal, stride, summary):
  b, length = q.shape[:2]
  pos, valid = positions(b, length, mask)
  block = min(length, stride)
  n = -(-length // block)
  # Own block: the block-diagonal layout (block = stride).
  own = kernel.attend(q, k, v, kernel.Layout.from_blocks(np.eye(n, dtype=bool), block, block),
                      q_pos=pos, k_pos=pos, k_valid=valid, causal=causal)
  idx = np.array([p for p in range(length) if p % stride >= stride - summary], np.int32)
  if idx.size == 0:
    return own
  spos = idx[None]  # one row for every example
  other = _full(q, k[:, idx], v[:, idx], q_pos=pos, k_pos=spos, k_valid=valid[:, idx],
                causal=causal, rule=OtherBlock(stride))
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
  backends = kernel.BACKENDS

  decodable = True

  pattern: str = "strided"
  stride: int = 128
  summary: int | None = None

  def check_options(self):
    _check(self.pattern, self.stride, self.summary)

  def decode_init(self, batch, heads, head_dim, head_dim_v, capacity, dtype=jnp.float32):
    """A key cache of ``capacity`` slots (strided / summary keys reach back to the start)."""
    return decoding.cache_init(batch, capacity, heads, head_dim, head_dim_v, dtype)

  def decode_step(self, q, k, v, state, position, valid):
    stride, summary = self.stride, _summary(self.stride, self.summary)

    def allow(i, j):
      if self.pattern == "strided":
        ok = (i - j < stride) | ((i - j) % stride == 0)
      else:
        ok = (i // stride == j // stride) | (j % stride >= stride - summary)
      return ok[:, None]
    return decoding.cache_step(q, k, v, state, position, valid, allow)

  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    del deterministic
    with kernel.backend(self.implementation):
      return sparse_attention(q, k, v, mask=mask, causal=self.causal, pattern=self.pattern,
                              stride=self.stride, summary=self.summary)

  def allow_matrix(self, length: int, num_heads: int = 1) -> np.ndarray:
    return np.broadcast_to(
        sparse_pattern(length, self.pattern, self.stride, self.summary, self.causal),
        (num_heads, length, length))

"""Dilated sliding-window attention (Longformer, Beltagy et al., 2020), per-head dilation."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from effx.attention import decoding, kernel
from effx.attention.base import Family, check_positive, check_qkv, zero_padded_queries
from effx.attention.core import from_residues, to_residues
from effx.attention.local import band_pattern, local_parts
from effx.attention.registry import register


def _per_head(dilation: int | Sequence[int] | None, heads: int) -> tuple[int, ...]:
  if dilation is None:  # the default: the first half of the heads undilated, the rest 2
    return tuple(1 if h < -(-heads // 2) else 2 for h in range(heads))
  if isinstance(dilation, int):
    return (dilation,) * heads
  dilation = tuple(dilation)
  if len(dilation) != heads:
    raise ValueError(f"dilated: option dilation={dilation} gives {len(dilation)} values but "
                     f"there are {heads} heads; give one int or one value per head")
  return dilation


def _check_dilation(dilation) -> None:
  if dilation is None:
    return
  values = (dilation,) if isinstance(dilation, int) else tuple(dilation)
  for d in values:
    check_positive("dilated", "dilation", d)


def _dilated_one(q, k, v, mask, causal, window, d):
  """One dilation for all given heads: the positions with equal residue mod ``d`` form
  a sequence on which the dilated window is an ordinary window of the same width."""
  if d == 1:
    return local_parts(q, k, v, mask=mask, causal=causal, window=window)[0]
  b, length = q.shape[:2]
  valid = jnp.ones((b, length), bool) if mask is None else mask
  out, _ = local_parts(to_residues(q, d), to_residues(k, d), to_residues(v, d),
                       mask=to_residues(valid, d), causal=causal, window=window)
  return from_residues(out, d, length)


def dilated_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                      causal: bool = False, window: int = 64,
                      dilation: int | Sequence[int] | None = None) -> jax.Array:
  """Dilated sliding-window attention.

  Query ``i`` sees key ``j`` iff ``(i - j) % d == 0`` and ``|i - j| <= window * d``
  (``j <= i`` when causal), with ``d`` the head's dilation: ``window`` keys on each side,
  ``d - 1`` positions apart. Cost O(length * window) for any dilation.

  Args:
    q, k: ``[batch, length, heads, head_dim]``; v: ``[batch, length, heads, head_dim_v]``.
    mask: optional ``[batch, length]`` padding mask (True = real token).
    causal: see only earlier positions.
    window: attended keys on each side (one-sided width, as in ``local``).
    dilation: one int for every head, one per head (Longformer gives some heads
      dilation 1 and others more), or None (default): the first half of the heads
      (rounded up) at dilation 1, the others at 2. Dilation ``d`` on every head keeps
      positions of different residues mod ``d`` apart in every layer: a [CLS] token at
      position 0 then never sees the odd positions, and the model cannot learn tasks
      that read the whole sequence there (ListOps, MQAR).

  Returns:
    ``[batch, length, heads, head_dim_v]`` in ``q``'s dtype; zeros at padded queries.
  """
  mask = check_qkv("dilated", q, k, v, mask)
  check_positive("dilated", "window", window)
  _check_dilation(dilation)
  per_head = _per_head(dilation, q.shape[2])
  if len(set(per_head)) == 1:
    out = _dilated_one(q, k, v, mask, causal, window, per_head[0])
    return zero_padded_queries(out.astype(q.dtype), mask)
  outs = []
  heads_in_order = []
  for d in sorted(set(per_head)):
    idx = np.array([i for i, x in enumerate(per_head) if x == d])
    outs.append(_dilated_one(q[:, :, idx], k[:, :, idx], v[:, :, idx], mask, causal, window, d))
    heads_in_order.extend(idx.tolist())
  out = jnp.concatenate(outs, axis=2)[:, :, np.argsort(heads_in_order)]
  return zero_padded_queries(out.astype(q.dtype), mask)


@register("dilated")
class DilatedAttention(Family):
  """Dilated sliding window.

  Attributes:
    window: attended keys on each side of the query (default 64).
    dilation: gap multiplier, one int or a tuple with one value per head; default None:
      the first half of the heads at 1, the others at 2 (dilation on every head keeps
      residue classes apart in every layer, see ``dilated_attention``).
  """

  pattern_kind = "static"
  backends = kernel.BACKENDS
  decodable = True
  derived_defaults = {"dilation": "1 on the first half of the heads (rounded up), 2 on the rest"}

  window: int = 64
  dilation: int | tuple[int, ...] | None = None

  def check_options(self):
    check_positive("dilated", "window", self.window)
    _check_dilation(self.dilation)

  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    del deterministic
    with kernel.backend(self.implementation):
      return dilated_attention(q, k, v, mask=mask, causal=self.causal, window=self.window,
                               dilation=self.dilation)

  def decode_init(self, batch, heads, head_dim, head_dim_v, capacity, dtype=jnp.float32):
    """A ring buffer of the last ``window * max(dilation) + 1`` tokens."""
    reach = self.window * max(_per_head(self.dilation, heads))
    return decoding.cache_init(batch, min(reach + 1, capacity), heads, head_dim,
                               head_dim_v, dtype)

  def decode_step(self, q, k, v, state, position, valid):
    d = jnp.asarray(_per_head(self.dilation, q.shape[1]))[None, :, None]    # [1, h, 1]

    def allow(i, j):
      distance = (i - j)[:, None, :]
      return (distance <= self.window * d) & (distance % d == 0)
    return decoding.cache_step(q, k, v, state, position, valid, allow)

  def allow_matrix(self, length: int, num_heads: int = 1) -> np.ndarray:
    """``[num_heads, length, length]`` allow-matrix (one per head's dilation)."""
    return np.stack([band_pattern(length, self.window, self.causal, d)
                     for d in _per_head(self.dilation, num_heads)])

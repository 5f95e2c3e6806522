"""The element rules inside a visited tile, shared by every backend of ``kernel.attend``.

Which (query, key) pairs of a tile are allowed, and the logit bias added to them, from
the query side's ``(pos, segment, info)`` and the key side's ``(pos, valid, segment,
info)``: arrays shaped ``[..., block]`` (``[..., block, features]`` for ``info``) that
broadcast against each other, so the XLA kernel's batched steps and a Pallas program's
single tile use the same code.
"""

from __future__ import annotations

import numpy as np


def band_blocks(length: int, block: int, before: int, after: int) -> np.ndarray:
  """Bool ``[n, n]`` (``n = ceil(length / block)``): the block pairs holding a key ``j``
  with ``i - before <= j <= i + after`` for some query ``i`` of the block (queries and
  keys at the same positions ``0 .. length - 1``)."""
  n = -(-length // block)
  first = np.arange(n) * block
  last = np.minimum(first + block, length) - 1
  lo = np.maximum(first - before, 0) // block
  hi = np.minimum(last + after, length - 1) // block
  ids = np.arange(n)
  return (ids[None, :] >= lo[:, None]) & (ids[None, :] <= hi[:, None])


def allowed(static, qmeta, kmeta):
  """Bool ``[..., bq, bk]``: key valid, ``k_pos <= q_pos`` when ``static.causal``,
  ``static.rule(q_pos, k_pos)`` when given, equal segments when given."""
  qp, qs, _ = qmeta
  kp, kv, ks, _ = kmeta
  mask = kv[..., None, :]
  if static.causal:
    mask = mask & (kp[..., None, :] <= qp[..., :, None])
  if static.rule is not None:
    mask = mask & static.rule(qp[..., :, None], kp[..., None, :])
  if qs is not None:
    mask = mask & (qs[..., :, None] == ks[..., None, :])
  return mask


def bias(static, qmeta, kmeta):
  """``static.bias(q_info, k_info)`` as ``[..., bq, bk]`` logits."""
  return static.bias(qmeta[2][..., :, None, :], kmeta[3][..., None, :, :])

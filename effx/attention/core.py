"""Numerics shared by the sparse families: position rules for the block-sparse kernel
(``kernel.attend``), a masked softmax of given logits (``attention_from_logits``, for the
learned-mixing families: linformer, synthesizer), and the merge of partial softmaxes by
their log-sum-exp.

When a query's allowed keys are split over several parts (a band plus strided keys,
several hash rounds), each part returns ``(out, lse)`` and ``merge`` combines them into the exact
softmax over the union.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# A finite "minus infinity": exp() of it is 0, and unlike -inf it never makes NaN in
# (x - max) when a whole row is masked, in the forward pass or in gradients.
NEG = -1e30


# Position rules: which (query position, key position) pairs a family allows, as hashable
# callables on broadcast integer arrays (hashable so they can be static arguments of jit
# and custom_vjp).
@dataclasses.dataclass(frozen=True)
class Band:
  """``|i - j| <= window``."""
  window: int

  def __call__(self, qp, kp):
    return jnp.abs(qp - kp) <= self.window


@dataclasses.dataclass(frozen=True)
class NotSelf:
  """``i != j``."""

  def __call__(self, qp, kp):
    return qp != kp


@dataclasses.dataclass(frozen=True)
class OtherBlock:
  """``i // size != j // size``."""
  size: int

  def __call__(self, qp, kp):
    return qp // self.size != kp // self.size


@dataclasses.dataclass(frozen=True)
class KeyIn:
  """Key position in ``positions``."""
  positions: tuple[int, ...]

  def __call__(self, qp, kp):
    hit = jnp.zeros(jnp.broadcast_shapes(qp.shape, kp.shape), bool)
    for p in self.positions:
      hit = hit | (kp == p)
    return hit


@dataclasses.dataclass(frozen=True)
class AnyOf:
  rules: tuple[Callable, ...]

  def __call__(self, qp, kp):
    out = jnp.zeros(jnp.broadcast_shapes(qp.shape, kp.shape), bool)
    for rule in self.rules:
      out = out | rule(qp, kp)
    return out


@dataclasses.dataclass(frozen=True)
class AllOf:
  rules: tuple[Callable, ...]

  def __call__(self, qp, kp):
    out = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), bool)
    for rule in self.rules:
      out = out & rule(qp, kp)
    return out


def attention_from_logits(logits: jax.Array, v: jax.Array, allowed: jax.Array
                          ) -> tuple[jax.Array, jax.Array]:
  """Masked softmax of ``logits [..., heads, a, c]`` applied to ``v [..., c, heads, dv]``.

  Returns ``out [..., a, heads, dv]`` float32 (zeros where a query has no allowed key)
  and ``lse [..., a, heads]`` float32, the log-sum-exp of the allowed logits (``NEG`` for a
  query with no allowed key).
  """
  logits = jnp.where(allowed, logits.astype(jnp.float32), NEG)
  # The result does not depend on the shift, so its gradient is exactly zero.
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  weights = jnp.where(allowed, jnp.exp(logits - row_max), 0.0)
  denom = jnp.sum(weights, axis=-1)  # [..., heads, a]
  safe = jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("...hqk,...khd->...qhd", weights / safe[..., None], v.astype(jnp.float32))
  lse = jnp.where(denom > 0, row_max[..., 0] + jnp.log(safe), NEG)
  return out, jnp.swapaxes(lse, -1, -2)


def merge(parts: Sequence[tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array]:
  """Combines partial softmax attentions over disjoint key sets.

  Each part is ``(out [..., heads, dv], lse [..., heads])`` as returned by
  ``kernel.attend`` or ``attention_from_logits``. The result is the softmax attention over the
  union of the parts' keys, with its own log-sum-exp.
  """
  outs = jnp.stack([o for o, _ in parts])
  lses = jnp.stack([s for _, s in parts])
  top = jax.lax.stop_gradient(jnp.max(lses, axis=0))
  weights = jnp.exp(lses - top)  # 1 for the largest part, so the sum is >= 1
  total = jnp.sum(weights, axis=0)
  out = jnp.sum(outs * (weights / total)[..., None], axis=0)
  lse = top + jnp.log(total)
  empty = top <= NEG / 2
  return jnp.where(empty[..., None], 0.0, out), jnp.where(empty, NEG, lse)


def pad_axis(x: jax.Array, multiple: int, axis: int, value=0) -> jax.Array:
  """Pads ``axis`` of ``x`` at the end up to a multiple of ``multiple`` (numpy stays
  numpy)."""
  size = x.shape[axis]
  extra = -size % multiple
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  xp = np if isinstance(x, np.ndarray) else jnp
  return xp.pad(x, widths, constant_values=value)


def to_residues(x: jax.Array, d: int) -> jax.Array:
  """``[batch, length, ...] -> [batch * d, ceil(length / d), ...]``: the positions with
  equal residue mod ``d`` as separate sequences (length padded with zeros)."""
  b = x.shape[0]
  x = pad_axis(x, d, axis=1)
  xp = np if isinstance(x, np.ndarray) else jnp
  x = xp.swapaxes(x.reshape(b, -1, d, *x.shape[2:]), 1, 2)
  return x.reshape(b * d, -1, *x.shape[3:])


def from_residues(x: jax.Array, d: int, length: int) -> jax.Array:
  """Inverse of ``to_residues``, cropped to ``length``."""
  b = x.shape[0] // d
  x = jnp.swapaxes(x.reshape(b, d, *x.shape[1:]), 1, 2)
  return x.reshape(b, -1, *x.shape[3:])[:, :length]


def positions(batch: int, length: int, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """``(pos [1, length] int32, valid [batch, length] bool)`` for a padding mask.
  ``pos`` is a numpy constant, one row that broadcasts over the batch: the kernel's splash
  backend builds its masks from it, and numpy has no symbolic batch (``jax.export``)."""
  pos = np.arange(length, dtype=np.int32)[None, :]
  valid = jnp.ones((batch, length), bool) if mask is None else mask
  return pos, valid


def extents(batch: int, length: int, mask: jax.Array | None) -> jax.Array:
  """Each example's extent, its last real position + 1 (``[batch]`` int32; 0 when it has
  no real token). Plans that families draw over blocks or positions (BigBird's blocks,
  Sinkhorn's sorted blocks, cosFormer's horizon) use it, so that trailing padding changes
  no real output."""
  if mask is None:
    return jnp.full((batch,), length, jnp.int32)
  return jnp.max(jnp.where(mask, jnp.arange(length, dtype=jnp.int32)[None, :] + 1, 0), axis=1)

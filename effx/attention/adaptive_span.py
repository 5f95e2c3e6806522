"""Adaptive attention span (Sukhbaatar et al., 2019): every head learns how far back it
looks.

Head ``h`` has a span ``z_h`` (tokens, ``0 .. max_span``). Its attention weights are
multiplied by the soft mask ``m(x) = clamp((R + z_h - x) / R, 0, 1)`` of the distance
``x = |i - j|`` (``R`` the ramp) and renormalised::

    a_ij = m(x_ij) exp(s_ij) / sum_j' m(x_ij') exp(s_ij')

so the span gets a gradient from the keys in its ramp (at the ramp's two ends, ``x = z``
and ``x = z + R``, the one-sided derivative from below is taken: ``1 / R`` and 0). A penalty ``span_loss * mean_h
z_h`` (summed over layers) pulls spans down; the model reports it as an auxiliary loss
(the ``losses`` collection) that the training loop adds to every objective's loss, and the
spans as train metrics ``span/<layer>/<head>`` (the ``metrics`` collection). The span is
stored as the fraction ``z / max_span`` (parameter ``span_fraction``, one per head), which
the training step clamps to ``[0, 1]`` after every update (``Family.bounds``).

Compute is trimmed to the longest current span: keys at distance ``>= z + R`` have weight
0, so each query block visits only the key blocks within ``max_h z_h + R`` (rounded up to
a whole number of blocks, then to a power of two of blocks). All those band widths are
compiled once, as the branches of one ``lax.switch`` picked from the spans at run time:
nothing is recompiled as the spans move, and ``max_span`` bounds the widest branch.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effx.attention import decoding
from effx.attention.base import Family, check_positive, check_qkv, zero_padded_queries
from effx.attention.registry import register

f32 = jnp.float32
BLOCK = 64  # query block length of the band (shorter sequences: one block)


def ramp_mask(distance: jax.Array, span: jax.Array, ramp: int) -> jax.Array:
  """``clamp((ramp + span - distance) / ramp, 0, 1)``, the soft span mask."""
  return jnp.clip((ramp + span - distance) / ramp, 0.0, 1.0)


def reach(span: jax.Array, max_span: int, ramp: int) -> jax.Array:
  """The farthest distance with a non-zero weight for spans ``span`` (tokens, any
  shape): ``min(max_span, ceil(max(span) + ramp) - 1)``, an int32 scalar."""
  far = jnp.ceil(jnp.max(span) + ramp).astype(jnp.int32) - 1
  return jnp.clip(far, 0, max_span)


def widths(length: int, max_span: int, block: int) -> tuple[int, ...]:
  """The band widths (in key blocks on each side of the diagonal block) compiled for one
  call: powers of two up to the one that covers ``max_span``, capped by the length."""
  most = min(math.ceil(max_span / block), math.ceil(length / block) - 1)
  out, w = [0], 1
  while w < most:
    out.append(w)
    w *= 2
  if most > 0:
    out.append(most)
  return tuple(out)


def _band(q, k, v, valid, span, *, causal, max_span, ramp, block, width):
  """Ramp-weighted attention over the ``width`` key blocks on each side (only before
  when causal) of each query block; ``q, k, v`` padded to whole blocks.

  A scan over query blocks, each step rematerialised in the backward pass: temporaries
  are one block's ``[heads, block, keys]`` weights, not the whole band's."""
  b, length, h, d = q.shape
  n = length // block
  before, after = width * block, 0 if causal else width * block
  keys = before + block + after
  pad = lambda x, fill: jnp.pad(x, [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2),
                                constant_values=fill)
  kp, vp, okp = pad(k, 0), pad(v, 0), pad(valid, False)
  # Distances within a block's window are the same for every block.
  dist = np.arange(block)[:, None] - (np.arange(keys)[None, :] - before)   # [block, keys]
  reachable = (np.abs(dist) <= max_span) & ((dist >= 0) if causal else True)
  weight = ramp_mask(np.abs(dist).astype(np.float32), span[:, None, None], ramp)
  weight = jnp.where(reachable, weight, 0.0)                                # [h, block, keys]

  @jax.checkpoint
  def step(_, xs):
    i, qi = xs                                               # qi [b, block, h, d]
    ki, vi, ok = (jax.lax.dynamic_slice_in_dim(x, i * block, keys, axis=1)
                  for x in (kp, vp, okp))
    s = jnp.einsum("bqhd,bkhd->bhqk", qi, ki, preferred_element_type=f32) * d ** -0.5
    w = weight[None] * ok[:, None, None, :]
    seen = w > 0
    top = jax.lax.stop_gradient(jnp.max(jnp.where(seen, s, -jnp.inf), -1, keepdims=True))
    # Unseen logits may exceed every seen one: they are kept out of the exponent.
    e = jnp.exp(jnp.where(seen, s - jnp.where(jnp.isfinite(top), top, 0.0), -jnp.inf)) * w
    den = jnp.sum(e, -1, keepdims=True)
    p = e / jnp.where(den > 0, den, 1.0)
    return None, jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), vi,
                            preferred_element_type=f32)

  qb = jnp.moveaxis(q.reshape(b, n, block, h, d), 1, 0)
  _, out = jax.lax.scan(step, None, (jnp.arange(n), qb))      # [n, b, block, h, dv]
  return jnp.moveaxis(out, 0, 1).reshape(b, length, h, -1)


def adaptive_span_attention(q: jax.Array, k: jax.Array, v: jax.Array, span: jax.Array, *,
                            mask: jax.Array | None = None, causal: bool = False,
                            max_span: int = 1024, ramp: int = 32) -> jax.Array:
  """Attention whose weights fade out past each head's span.

  Args:
    q, k: ``[batch, length, heads, head_dim]``; v: ``[batch, length, heads, head_dim_v]``.
    span: ``[heads]`` spans ``z`` in tokens (float; differentiable).
    mask: optional ``[batch, length]`` padding mask (True = real token).
    causal: keys ``j <= i`` only (the distance is ``i - j``); otherwise both sides
      (``|i - j|``).
    max_span: no key farther than this is ever seen; the widest band compiled.
    ramp: ``R``, the length over which a weight falls from 1 to 0.

  Returns:
    ``[batch, length, heads, head_dim_v]`` in ``q``'s dtype; zeros at padded queries.
  """
  mask = check_qkv("adaptive_span", q, k, v, mask)
  b, length, h, _ = q.shape
  if span.shape != (h,):
    raise ValueError(f"adaptive_span: span must be [heads] = ({h},), got {span.shape}")
  block = min(BLOCK, length)
  padded = -(-length // block) * block
  valid = jnp.ones((b, length), bool) if mask is None else mask
  grow = lambda x, fill: jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2),
                                 constant_values=fill)
  q, k, v, valid = grow(q, 0), grow(k, 0), grow(v, 0), grow(valid, False)
  span = span.astype(f32)
  options = widths(padded, max_span, block)
  branches = [lambda q, k, v, valid, span, w=w: _band(
      q, k, v, valid, span, causal=causal, max_span=max_span, ramp=ramp, block=block, width=w)
      for w in options]
  need = -(-jax.lax.stop_gradient(reach(span, max_span, ramp)) // block)
  index = jnp.searchsorted(jnp.asarray(options), need)  # the narrowest band that covers it
  out = jax.lax.switch(index, branches, q, k, v, valid, span)[:, :length]
  return zero_padded_queries(out.astype(q.dtype), mask)


@register("adaptive_span")
class AdaptiveSpanAttention(Family):
  """Adaptive attention span (Sukhbaatar et al. 2019), see ``adaptive_span_attention``.

  Attributes:
    max_span: the longest span a head may learn (tokens); default 1024.
    ramp: ``R``, the soft mask's ramp length; default 32 (the paper's).
    init_span: each head's initial span as a fraction of ``max_span``; default 0 (the
      paper's: spans grow where the loss asks for context).
    span_loss: ``lambda`` of the penalty ``lambda * mean span`` (tokens, per layer);
      default 2e-6 (the paper's enwik8 setting).
  """

  decodable = True
  bounds = {"span_fraction": (0.0, 1.0)}
  auxiliary_loss = True

  max_span: int = 1024
  ramp: int = 32
  init_span: float = 0.0
  span_loss: float = 2e-6

  def check_options(self):
    check_positive("adaptive_span", "max_span", self.max_span)
    check_positive("adaptive_span", "ramp", self.ramp)
    if not 0.0 <= self.init_span <= 1.0:
      raise ValueError(f"adaptive_span: option init_span={self.init_span!r} must be in [0, 1] "
                       "(a fraction of max_span)")
    if not self.span_loss >= 0.0:
      raise ValueError(f"adaptive_span: option span_loss={self.span_loss!r} must be >= 0")

  def _spans(self, heads: int) -> jax.Array:
    fraction = self.param("span_fraction", nn.initializers.constant(self.init_span), (heads,),
                          f32)
    spans = fraction * self.max_span
    if not self.is_initializing():  # reported where a caller makes them mutable
      # One value per module however often it is called (a dual encoder calls its
      # layers twice): the penalty is on the parameters, counted once.
      last = dict(reduce_fn=lambda _, x: x, init_fn=lambda: None)
      self.sow("losses", "span", self.span_loss * jnp.mean(spans), **last)
      self.sow("metrics", "span", jax.lax.stop_gradient(spans), **last)
    return spans

  @nn.compact
  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    del deterministic
    return adaptive_span_attention(q, k, v, self._spans(q.shape[2]), mask=mask,
                                   causal=self.causal, max_span=self.max_span, ramp=self.ramp)

  def decode_init(self, batch, heads, head_dim, head_dim_v, capacity, dtype=jnp.float32):
    """A ring buffer of the last ``max_span + 1`` tokens, whatever the context length."""
    return decoding.cache_init(batch, min(self.max_span + 1, capacity), heads, head_dim,
                               head_dim_v, dtype)

  def decode_step(self, q, k, v, state, position, valid):
    spans = self.get_variable("params", "span_fraction") * self.max_span
    return decoding.cache_step(
        q, k, v, state, position, valid, lambda i, j: (i - j <= self.max_span)[:, None],
        weight=lambda i, j: ramp_mask((i - j)[:, None].astype(f32), spans[None, :, None],
                                      self.ramp))

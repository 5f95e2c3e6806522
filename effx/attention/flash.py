"""Exact attention in query/key chunks with an online softmax and a recomputing backward.

This is the algorithm of Rabe & Staats (2021) and FlashAttention (Dao et al., 2022) in
pure JAX. The forward pass scans key chunks keeping a running max, normaliser and
accumulator per query; it saves only ``q, k, v``, the output and the per-query
log-sum-exp. The backward pass (a ``jax.custom_vjp``) recomputes each chunk's
probabilities from the saved log-sum-exp, so forward and backward memory are
O(length * chunk), never O(length ** 2).

Which keys a query may see is given by positions, not by a materialised matrix: a key is
allowed iff it is valid, not after the query when ``causal``, and allowed by an optional
``rule`` on ``(query_position, key_position)`` (a band, "not the same block", ...). Chunk
pairs with no allowed entry are skipped.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from effx.attention.core import NEG, pad_axis

f32 = jnp.float32


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, q_pos: jax.Array, k_pos: jax.Array,
           k_valid: jax.Array, causal: bool = False, rule: Callable | None = None,
           scale: float | None = None, q_chunk: int = 512, k_chunk: int = 512
           ) -> tuple[jax.Array, jax.Array]:
  """Exact softmax attention computed chunk by chunk.

  Args:
    q: ``[batch, q_len, heads, d]``.
    k: ``[batch, k_len, heads, d]``.
    v: ``[batch, k_len, heads, dv]``.
    q_pos: ``[batch, q_len]`` integer positions of the queries.
    k_pos: ``[batch, k_len]`` integer positions of the keys.
    k_valid: ``[batch, k_len]`` bool, False for padding keys.
    causal: a key is allowed only if ``k_pos <= q_pos``.
    rule: optional hashable callable ``(q_pos[..., :, None], k_pos[..., None, :]) -> bool``
      restricting allowed pairs further.
    scale: logit scale, default ``d ** -0.5``.
    q_chunk, k_chunk: chunk lengths; lengths that are not multiples are padded
      internally (padded keys are invalid, padded queries are dropped).

  Returns:
    ``out [batch, q_len, heads, dv]`` float32 (zeros for a query with no allowed key) and
    ``lse [batch, q_len, heads]`` float32 (``NEG`` for such a query).
  """
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  static = (bool(causal), rule, scale, min(q_chunk, q.shape[1]), min(k_chunk, k.shape[1]))
  return _attend(q, k, v, q_pos.astype(jnp.int32), k_pos.astype(jnp.int32),
                 k_valid.astype(bool), static)


def _chunks(x, size, fill=0):
  """[batch, length, ...] -> [n, batch, size, ...], padding length with ``fill``."""
  x = pad_axis(x, size, axis=1, value=fill)
  n = x.shape[1] // size
  x = x.reshape(x.shape[0], n, size, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _unchunk(x, length):
  """[n, batch, size, ...] -> [batch, length, ...]."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _allowed(qp, kp, kvalid, causal, rule):
  """[batch, 1, q_chunk, k_chunk] boolean allow-mask for one chunk pair."""
  allowed = jnp.broadcast_to(kvalid[:, None, :], (kp.shape[0], qp.shape[1], kp.shape[1]))
  if causal:
    allowed = allowed & (kp[:, None, :] <= qp[:, :, None])
  if rule is not None:
    allowed = allowed & rule(qp[:, :, None], kp[:, None, :])
  return allowed[:, None]


def _scan(step, carry, xs):
  """lax.scan, without the loop when there is a single step."""
  if jax.tree.leaves(xs)[0].shape[0] == 1:
    carry, y = step(carry, jax.tree.map(lambda x: x[0], xs))
    return carry, jax.tree.map(lambda t: t[None], y)
  return jax.lax.scan(step, carry, xs)


def _forward(q, k, v, q_pos, k_pos, k_valid, static):
  causal, rule, scale, qc, kc = static
  b, lq, h, _ = q.shape
  dv = v.shape[-1]
  keys = (_chunks(k, kc), _chunks(v, kc), _chunks(k_pos, kc), _chunks(k_valid, kc, False))

  def one_query_chunk(_, xs):
    qi, qpi = xs

    def step(carry, ys):
      kj, vj, kpj, kvj = ys
      allowed = _allowed(qpi, kpj, kvj, causal, rule)

      def update(carry):
        m, l, acc = carry
        s = jnp.einsum("bqhd,bkhd->bhqk", qi, kj, preferred_element_type=f32) * scale
        s = jnp.where(allowed, s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("bhqk,bkhd->bhqd", p, vj.astype(f32))
        return m_new, l, acc

      return jax.lax.cond(jnp.any(allowed), update, lambda c: c, carry), None

    init = (jnp.full((b, h, qc), NEG, f32), jnp.zeros((b, h, qc), f32),
            jnp.zeros((b, h, qc, dv), f32))
    (m, l, acc), _ = _scan(step, init, keys)
    safe = jnp.where(l > 0, l, 1.0)
    out = jnp.swapaxes(acc / safe[..., None], 1, 2)          # [b, qc, h, dv]
    lse = jnp.swapaxes(jnp.where(l > 0, m + jnp.log(safe), NEG), 1, 2)  # [b, qc, h]
    return None, (out, lse)

  _, (out, lse) = _scan(one_query_chunk, None, (_chunks(q, qc), _chunks(q_pos, qc)))
  return _unchunk(out, lq), _unchunk(lse, lq)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attend(q, k, v, q_pos, k_pos, k_valid, static):
  return _forward(q, k, v, q_pos, k_pos, k_valid, static)


def _attend_fwd(q, k, v, q_pos, k_pos, k_valid, static):
  out, lse = _forward(q, k, v, q_pos, k_pos, k_valid, static)
  return (out, lse), (q, k, v, q_pos, k_pos, k_valid, out, lse)


def _attend_bwd(static, res, cotangents):
  causal, rule, scale, qc, kc = static
  q, k, v, q_pos, k_pos, k_valid, out, lse = res
  d_out, d_lse = cotangents
  lk = k.shape[1]
  # dS = P * (dP - delta): delta = rowsum(dO * O) from the softmax Jacobian, minus the
  # lse cotangent because d lse / d s = P.
  delta = jnp.sum(d_out * out, axis=-1) - d_lse  # [b, lq, h]
  keys = (_chunks(k, kc), _chunks(v, kc), _chunks(k_pos, kc), _chunks(k_valid, kc, False))
  queries = (_chunks(q, qc), _chunks(q_pos, qc), _chunks(d_out, qc), _chunks(lse, qc),
             _chunks(delta, qc))

  def one_query_chunk(carry, xs):
    dk_acc, dv_acc = carry
    qi, qpi, doi, lsei, deli = xs
    qi32 = qi.astype(f32)
    lse_t = jnp.swapaxes(lsei, 1, 2)[..., None]   # [b, h, qc, 1]
    del_t = jnp.swapaxes(deli, 1, 2)[..., None]

    def step(dqi, ys):
      kj, vj, kpj, kvj = ys
      allowed = _allowed(qpi, kpj, kvj, causal, rule)

      def grads(dqi):
        kj32 = kj.astype(f32)
        s = jnp.einsum("bqhd,bkhd->bhqk", qi32, kj32) * scale
        # s <= lse for every allowed pair; the clamp only guards padded query rows.
        p = jnp.where(allowed, jnp.exp(jnp.minimum(s - lse_t, 0.0)), 0.0)
        dv_j = jnp.einsum("bhqk,bqhd->bkhd", p, doi)
        dp = jnp.einsum("bqhd,bkhd->bhqk", doi, vj.astype(f32))
        ds = p * (dp - del_t) * scale
        dqi = dqi + jnp.einsum("bhqk,bkhd->bqhd", ds, kj32)
        dk_j = jnp.einsum("bhqk,bqhd->bkhd", ds, qi32)
        return dqi, (dk_j, dv_j)

      def skip(dqi):
        return dqi, (jnp.zeros(kj.shape, f32), jnp.zeros(vj.shape, f32))

      return jax.lax.cond(jnp.any(allowed), grads, skip, dqi)

    dqi, (dks, dvs) = _scan(step, jnp.zeros(qi.shape, f32), keys)
    return (dk_acc + dks, dv_acc + dvs), dqi

  zeros = (jnp.zeros(keys[0].shape, f32), jnp.zeros(keys[1].shape, f32))
  (dk, dv), dq = _scan(one_query_chunk, zeros, queries)
  return (_unchunk(dq, q.shape[1]).astype(q.dtype), _unchunk(dk, lk).astype(k.dtype),
          _unchunk(dv, lk).astype(v.dtype), None, None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)

"""The block-sparse kernel in Pallas: one flash-attention program per query block that
visits only the key blocks of its ``Layout`` row (``kernel.attend(implementation=
"pallas")``).

Forward: grid ``(batch, heads, query blocks)``; each program loads its query block once
and loops over its row of the layout's block table (a ``fori_loop`` whose trip count is
the row's length, so empty and short rows cost nothing), with an online softmax in
float32 (FlashAttention, Dao et al. 2022). The element rules (key padding, causality, a
position ``rule``, segment ids, a logit bias from per-token integers) are the XLA
kernel's own (``tiles``), evaluated on each tile.

Backward, with the same sparsity: one program per query block computes ``dq`` over its
row; one program per key block computes ``dk`` and ``dv`` over its column (the layout's
transpose, ``Layout.columns``), so no atomics and no ``[nq, nk]`` intermediate. Both
recompute the probabilities from the saved log-sum-exp.

On a GPU the program lowers to Triton (``num_warps=4, num_stages=2``): tiles must be
powers of two of at least 16 (head dims are zero-padded to one); on other devices it runs
in Pallas interpret mode, exact and slow, which is how the tests check it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from effx.attention import tiles
from effx.attention.core import NEG

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Static:
  """What the kernels specialise on (hashable)."""
  causal: bool
  rule: Callable | None
  bias: Callable | None
  scale: float
  block_q: int
  block_k: int
  interpret: bool


def tile_problem(block_q: int, block_k: int) -> str | None:
  """Why Triton cannot run tiles of ``block_q x block_k`` (None when it can)."""
  for name, n in (("block_q", block_q), ("block_k", block_k)):
    if n < 16 or n & (n - 1):
      return f"{name}={n}: Triton tiles must be powers of two of at least 16"
  return None


def _compiler_params(static):
  if static.interpret:
    return None
  from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415 (GPU-only module)
  return plgpu.CompilerParams(num_warps=4, num_stages=2)


def _whole(x):
  """The whole ``[b, h, ...]`` slice of one (batch, head) for every program."""
  rest = x.ndim - 2
  return pl.BlockSpec((None, None) + x.shape[2:], lambda b, h, i: (b, h) + (0,) * rest)


def _blocked(x, block):
  """Block ``i`` (the program's third grid index) of axis 2 of ``x [b, h, L, ...]``."""
  rest = x.ndim - 3
  return pl.BlockSpec((None, None, block) + x.shape[3:], lambda b, h, i: (b, h, i) + (0,) * rest)


def _read(refs, tree, at=None):
  """The metadata tree from its refs: whole blocks, or rows ``at`` (a ``pl.ds``)."""
  def load(r):
    return r[...] if at is None else r[(at,) + (slice(None),) * (len(r.shape) - 1)]
  return jax.tree.unflatten(tree, [load(r) for r in refs])


def _key_side(kmeta):
  kp, kv, ks, kinfo = kmeta
  return kp, kv != 0, ks, kinfo


def _scores_and_mask(static, q, k, qmeta, kmeta):
  s = jnp.dot(q, k.T, preferred_element_type=f32)
  allowed = tiles.allowed(static, qmeta, _key_side(kmeta))
  if static.bias is not None:
    s = s + tiles.bias(static, qmeta, kmeta)
  return s, allowed


def _forward_kernel(*refs, static, q_tree, k_tree):
  """Refs: row table, row counts, q block, k, v, q metadata block, k metadata; outputs
  ``o`` block and ``lse`` block."""
  nq_meta, nk_meta = q_tree.num_leaves, k_tree.num_leaves
  tab_ref, cnt_ref, q_ref, k_ref, v_ref = refs[:5]
  qm_refs = refs[5:5 + nq_meta]
  km_refs = refs[5 + nq_meta:5 + nq_meta + nk_meta]
  o_ref, lse_ref = refs[-2:]
  i, bk = pl.program_id(2), static.block_k
  q = q_ref[...]
  qmeta = _read(qm_refs, q_tree)

  def visit(t, state):
    m, den, acc = state
    at = pl.ds(pl.multiple_of(tab_ref[i, t] * bk, bk), bk)
    v = v_ref[at, :]
    s, allowed = _scores_and_mask(static, q, k_ref[at, :], qmeta, _read(km_refs, k_tree, at))
    s = jnp.where(allowed, s, -jnp.inf)  # m >= NEG is finite, so exp(-inf - m) = 0
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.exp(s - m_new[:, None])
    corr = jnp.exp(m - m_new)
    acc = acc * corr[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=f32)
    return m_new, den * corr + jnp.sum(p, axis=-1), acc

  bq, dv = q.shape[0], o_ref.shape[-1]
  state = (jnp.full((bq,), NEG, f32), jnp.zeros((bq,), f32), jnp.zeros((bq, dv), f32))
  m, den, acc = jax.lax.fori_loop(0, cnt_ref[i], visit, state)
  safe = jnp.where(den > 0, den, 1.0)
  o_ref[...] = acc / safe[:, None]
  lse_ref[...] = jnp.where(den > 0, m + jnp.log(safe), NEG)


def _probabilities(static, q, k, qmeta, kmeta, lse):
  s, allowed = _scores_and_mask(static, q, k, qmeta, kmeta)
  # s <= lse on allowed pairs; the clamp only guards rows padded to whole blocks.
  return jnp.where(allowed, jnp.exp(jnp.minimum(s - lse[:, None], 0.0)), 0.0)


def _dq_kernel(*refs, static, q_tree, k_tree):
  """Refs: row table, row counts, q, dO, lse, delta blocks, k, v, q metadata block, k
  metadata; output the ``dq`` block (of the scaled queries)."""
  nq_meta, nk_meta = q_tree.num_leaves, k_tree.num_leaves
  tab_ref, cnt_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref = refs[:8]
  qm_refs = refs[8:8 + nq_meta]
  km_refs = refs[8 + nq_meta:8 + nq_meta + nk_meta]
  (dq_ref,) = refs[-1:]
  i, bk = pl.program_id(2), static.block_k
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  qmeta = _read(qm_refs, q_tree)

  def visit(t, dq):
    at = pl.ds(pl.multiple_of(tab_ref[i, t] * bk, bk), bk)
    k, v = k_ref[at, :], v_ref[at, :]
    p = _probabilities(static, q, k, qmeta, _read(km_refs, k_tree, at), lse)
    dp = jnp.dot(do, v.T, preferred_element_type=f32)
    ds = p * (dp - delta[:, None])
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=f32)

  dq_ref[...] = jax.lax.fori_loop(0, cnt_ref[i], visit, jnp.zeros(dq_ref.shape, f32))


def _dkv_kernel(*refs, static, q_tree, k_tree):
  """Refs: column table, column counts, k, v blocks, q, dO, lse, delta, k metadata
  block, q metadata; outputs the ``dk`` and ``dv`` blocks."""
  nq_meta, nk_meta = q_tree.num_leaves, k_tree.num_leaves
  tab_ref, cnt_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref = refs[:8]
  km_refs = refs[8:8 + nk_meta]
  qm_refs = refs[8 + nk_meta:8 + nk_meta + nq_meta]
  dk_ref, dv_ref = refs[-2:]
  j, bq = pl.program_id(2), static.block_q
  k, v = k_ref[...], v_ref[...]
  kmeta = _read(km_refs, k_tree)

  def visit(t, grads):
    dk, dv = grads
    at = pl.ds(pl.multiple_of(tab_ref[j, t] * bq, bq), bq)
    q, do = q_ref[at, :], do_ref[at, :]
    p = _probabilities(static, q, k, _read(qm_refs, q_tree, at), kmeta, lse_ref[at])
    dv = dv + jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=f32)
    ds = p * (jnp.dot(do, v.T, preferred_element_type=f32) - delta_ref[at][:, None])
    return dk + jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=f32), dv

  zeros = (jnp.zeros(dk_ref.shape, f32), jnp.zeros(dv_ref.shape, f32))
  dk, dv = jax.lax.fori_loop(0, cnt_ref[j], visit, zeros)
  dk_ref[...], dv_ref[...] = dk, dv


def _flat(meta):
  leaves, tree = jax.tree.flatten(meta)
  return leaves, tree


def _forward(q, k, v, meta, tables, static):
  qmeta, kmeta = meta
  (rows, row_counts), _ = tables
  b, h, lq, _ = q.shape
  bq = static.block_q
  q_leaves, q_tree = _flat(qmeta)
  k_leaves, k_tree = _flat(kmeta)
  kernel = functools.partial(_forward_kernel, static=static, q_tree=q_tree, k_tree=k_tree)
  o, lse = pl.pallas_call(
      kernel, grid=(b, h, lq // bq),
      in_specs=[_whole(rows), _whole(row_counts), _blocked(q, bq), _whole(k), _whole(v),
                *(_blocked(x, bq) for x in q_leaves), *(_whole(x) for x in k_leaves)],
      out_specs=[pl.BlockSpec((None, None, bq, v.shape[-1]), lambda b, h, i: (b, h, i, 0)),
                 pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct((b, h, lq, v.shape[-1]), f32),
                 jax.ShapeDtypeStruct((b, h, lq), f32)],
      interpret=static.interpret, compiler_params=_compiler_params(static),
      name="effx_block_sparse_forward",
  )(rows, row_counts, q, k, v, *q_leaves, *k_leaves)
  return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, meta, tables, static):
  return _forward(q, k, v, meta, tables, static)


def _flash_fwd(q, k, v, meta, tables, static):
  o, lse = _forward(q, k, v, meta, tables, static)
  return (o, lse), (q, k, v, meta, tables, o, lse)


def _flash_bwd(static, res, cotangents):
  q, k, v, meta, tables, o, lse = res
  qmeta, kmeta = meta
  (rows, row_counts), (cols, col_counts) = tables
  d_out, d_lse = cotangents
  b, h, lq, _ = q.shape
  lk = k.shape[2]
  bq, bk = static.block_q, static.block_k
  # dS = P * (dP - delta): delta = rowsum(dO * O) from the softmax Jacobian, minus the lse
  # cotangent because d lse / d s = P.
  delta = jnp.sum(d_out * o, axis=-1) - d_lse
  do = d_out.astype(v.dtype)
  q_leaves, q_tree = _flat(qmeta)
  k_leaves, k_tree = _flat(kmeta)
  trees = dict(static=static, q_tree=q_tree, k_tree=k_tree)
  common = dict(interpret=static.interpret, compiler_params=_compiler_params(static))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **trees), grid=(b, h, lq // bq),
      in_specs=[_whole(rows), _whole(row_counts), _blocked(q, bq), _blocked(do, bq),
                _blocked(lse, bq), _blocked(delta, bq), _whole(k), _whole(v),
                *(_blocked(x, bq) for x in q_leaves), *(_whole(x) for x in k_leaves)],
      out_specs=_blocked(q, bq), out_shape=jax.ShapeDtypeStruct(q.shape, f32),
      name="effx_block_sparse_dq", **common,
  )(rows, row_counts, q, do, lse, delta, k, v, *q_leaves, *k_leaves)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, **trees), grid=(b, h, lk // bk),
      in_specs=[_whole(cols), _whole(col_counts), _blocked(k, bk), _blocked(v, bk),
                _whole(q), _whole(do), _whole(lse), _whole(delta),
                *(_blocked(x, bk) for x in k_leaves), *(_whole(x) for x in q_leaves)],
      out_specs=[_blocked(k, bk), _blocked(v, bk)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, f32), jax.ShapeDtypeStruct(v.shape, f32)],
      name="effx_block_sparse_dkv", **common,
  )(cols, col_counts, k, v, q, do, lse, delta, *k_leaves, *q_leaves)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
          jax.tree.map(lambda _: None, meta), jax.tree.map(lambda _: None, tables))


_flash.defvjp(_flash_fwd, _flash_bwd)


def attend(q, k, v, meta, tables, static: Static):
  """Block-sparse attention of pre-scaled queries.

  Args:
    q: ``[b, h, Lq, d]`` queries already multiplied by the logit scale, ``Lq`` a
      multiple of ``static.block_q``.
    k, v: ``[b, h, Lk, d]`` / ``[b, h, Lk, dv]``, ``Lk`` a multiple of ``block_k``.
    meta: ``((q_pos, q_segment, q_info), (k_pos, k_valid, k_segment, k_info))``, each
      ``[b, h, L]`` int32 (``[b, h, L, features]`` for info) or None; ``k_valid`` int32.
    tables: ``((rows, row_counts), (columns, column_counts))`` from ``Layout.rows`` and
      ``Layout.columns`` broadcast to ``[b, h, ...]``.
    static: the element rules and tiles.

  Returns:
    ``out [b, h, Lq, dv]`` float32 and ``lse [b, h, Lq]`` float32 (``NEG`` for a query
    with no allowed key, whose output is zero).
  """
  d, dv = q.shape[-1], v.shape[-1]
  if not static.interpret:  # Triton tiles: head dims padded to a power of two >= 16
    pad = lambda x, n: jnp.pad(x, [(0, 0)] * 3 + [(0, n - x.shape[-1])])  # noqa: E731
    width = max(16, pl.next_power_of_2(d))
    q, k = pad(q, width), pad(k, width)
    v = pad(v, max(16, pl.next_power_of_2(dv)))
  out, lse = _flash(q, k, v, meta, tables, static)
  return out[..., :dv], lse

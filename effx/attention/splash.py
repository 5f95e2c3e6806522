"""``kernel.attend`` on TPU splash attention (``jax.experimental.pallas.ops.tpu``).

Splash attention takes one element mask per head, the same for every example, known when
the program is traced; it skips the 128-wide tiles the mask leaves empty and takes
padding as segment ids. A call of the block-sparse kernel is expressible that way when
its layout is static, its positions are constants (not computed at run time) that give
one mask for every example, and it has no logit bias: ``plan`` says which, and builds
the mask (splash's lazy ``FullMask`` / ``CausalMask`` / ``LocalMask`` where the layout
and rule are those, else a ``NumpyMask`` of the visited blocks, causality and the rule).
Per-example layouts (BigBird's random blocks, LSH's buckets) are not expressible.

The kernel returns outputs and log-sum-exps; families merge partial results through the
log-sum-exp, so its gradient must flow. Splash's own ``custom_vjp`` differentiates the
output only, so ``_splash`` wraps splash's forward (with residuals) and backward in a
``custom_vjp`` of its own that folds the log-sum-exp cotangent ``g`` into the backward:
``d logit_ij = p_ij (do_i . v_j - (do_i . o_i - g_i))``. Splash computes the bracket's
``do_i . o_i`` from its residuals, so an extra value column of zeros, an extra output
column ``-g_i`` and an extra cotangent column of ones give exactly that term (the
backward entry point is private to jax; tests/attention/test_backends.py checks it).

Off a TPU it runs in Pallas interpret mode: slow, exact, how tests check it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from effx.attention import tiles
from effx.attention.core import NEG, Band
from effx.common import axes

TILE = 128  # splash's lane width: lengths are padded to it, blocks are multiples of it
AUTO_PADDING = 1.5  # "auto" leaves calls padded more than this to the XLA kernel
_EMPTY = sk.DEFAULT_MASK_VALUE / 2  # a row whose splash lse is below this allowed nothing


@dataclasses.dataclass(frozen=True)
class Plan:
  """What ``attend`` runs: per-head masks over ``[q_len, k_len]`` padded to ``TILE``.

  ``masks`` holds one entry per head: ``("full",)``, ``("causal",)``,
  ``("local", left, right)`` or ``("numpy", sha1)`` with the array in ``arrays``."""
  q_len: int
  k_len: int
  masks: tuple
  arrays: dict = dataclasses.field(compare=False, hash=False, repr=False)

  def padding(self) -> float:
    """How many times longer the sequences splash runs are than the call's (each is
    padded to ``TILE``): residue sequences of 32 tokens run as 128."""
    return max(-(-n // TILE) * TILE / n for n in (self.q_len, self.k_len))


def _static(x):
  """``x`` as numpy when it is a constant of the trace, else None."""
  if x is None or isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def _lazy(layout, qp, kp, causal, rule):
  """A lazy mask description when the call is plain full / causal / banded attention."""
  lq, lk = qp.size, kp.size
  if (lq != lk or layout.block_q != layout.block_k or not np.array_equal(qp, np.arange(lq))
          or not np.array_equal(kp, qp)):
    return None
  blocks = layout.blocks()
  if rule is None:
    need = tiles.band_blocks(lq, layout.block_q, lq, 0 if causal else lq)
    return (("causal",) if causal else ("full",)) if not (need & ~blocks).any() else None
  if isinstance(rule, Band):
    need = tiles.band_blocks(lq, layout.block_q, rule.window, 0 if causal else rule.window)
    if not (need & ~blocks).any():
      return ("local", rule.window, 0 if causal else rule.window)
  return None


def _element_mask(layout, qp, kp, causal, rule):
  """Bool ``[q_len, k_len]``: in a visited block, causal on positions, the rule."""
  i, j = np.arange(qp.size), np.arange(kp.size)
  mask = layout.blocks()[i[:, None] // layout.block_q, j[None, :] // layout.block_k]
  if causal:
    mask = mask & (kp[None, :] <= qp[:, None])
  if rule is not None:
    mask = mask & np.asarray(_outside_traces(rule, qp[:, None], kp[None, :]))
  return mask


def _outside_traces(fn, *args, **kwargs):
  """``fn(*args, **kwargs)`` with no trace active, so that its jax arrays are constants.
  JAX's trace state is per thread and a fresh thread has none (``ensure_compile_time_eval``
  is not enough: flax's scan traces its body with partial evaluation first, and arrays
  made under it were that trace's tracers)."""
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(fn, *args, **kwargs).result()


def plan(layout, q_pos, k_pos, *, heads: int, causal: bool, rule, bias) -> Plan | str:
  """The splash plan of one ``kernel.attend`` call, or why there is none (a string)."""
  if not layout.static:
    return "its layout is drawn per example (splash masks are one per head)"
  if bias is not None:
    return "it adds a logit bias (splash takes none)"
  qp, kp = _static(q_pos), _static(k_pos)
  if qp is None or kp is None:
    return "its positions are computed at run time (splash masks are built when tracing)"
  qp, kp = (np.broadcast_to(x[:, None] if x.ndim == 2 else x, (x.shape[0], heads, x.shape[-1]))
            for x in (qp, kp))
  masks, arrays, seen = [], {}, {}
  for h in range(heads):
    rows = {(a.tobytes(), b.tobytes()): (a, b) for a, b in zip(qp[:, h], kp[:, h])}
    head = None
    for key, (a, b) in rows.items():
      if key not in seen:
        lazy = _lazy(layout, a, b, causal, rule)
        if lazy is None:
          mask = _element_mask(layout, a, b, causal, rule)
          digest = hashlib.sha1(np.packbits(mask).tobytes() + str(mask.shape).encode())
          lazy = ("numpy", digest.hexdigest())
          arrays[lazy[1]] = mask
        seen[key] = lazy
      if head is not None and seen[key] != head:
        return "its positions differ between examples (splash masks are one per head)"
      head = seen[key]
    masks.append(head)
  return Plan(qp.shape[-1], kp.shape[-1], tuple(masks), arrays)


def _tile(length: int) -> int:
  """Splash block: 512 on long sequences (fewer grid steps), else the 128-lane tile."""
  return 512 if length % 512 == 0 and length >= 2048 else TILE


_KERNELS: dict = {}


def _kernel(plan_: Plan, interpret: bool):
  """The splash kernel (forward with residuals) for ``plan_``, built once per plan."""
  key = (plan_, interpret)
  if key not in _KERNELS:
    lq, lk = -(-plan_.q_len // TILE) * TILE, -(-plan_.k_len // TILE) * TILE

    def head(desc):
      if desc[0] == "full":
        return sm.FullMask((lq, lk))
      if desc[0] == "causal":
        return sm.CausalMask((lq, lk))
      if desc[0] == "local":
        return sm.LocalMask((lq, lk), desc[1:], offset=0)
      mask = np.zeros((lq, lk), bool)
      mask[:plan_.q_len, :plan_.k_len] = plan_.arrays[desc[1]]
      return sm.NumpyMask(mask)

    bq, bk = _tile(lq), _tile(lk)
    blocks = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                           block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                           block_kv_dq=bk)
    cache = {}
    heads = [cache.setdefault(d, head(d)) for d in plan_.masks]
    if len(_KERNELS) >= 64:
      _KERNELS.clear()
    # The kernel's block tables are constants, cached across traces.
    _KERNELS[key] = _outside_traces(sk.make_splash_mha, sm.MultiHeadMask(heads),
                                    block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                    save_residuals=True, interpret=interpret)
  return _KERNELS[key]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _splash(plan_, interpret, q, k, v, q_seg, k_seg):
  return _splash_fwd(plan_, interpret, q, k, v, q_seg, k_seg)[0]


def _splash_fwd(plan_, interpret, q, k, v, q_seg, k_seg):
  out, (lse,) = _kernel(plan_, interpret)(q, k, v, sk.SegmentIds(q_seg, k_seg))
  ok = lse > _EMPTY  # rows that allowed no key: splash leaves NaN or a masked average
  out = jnp.where(ok[..., None], out.astype(jnp.float32), 0.0)
  return (out, jnp.where(ok, lse, NEG)), (q, k, v, q_seg, k_seg, out, jnp.where(ok, lse, 0.0),
                                          ok)


def _splash_bwd(plan_, interpret, res, cotangents):
  q, k, v, q_seg, k_seg, out, lse, ok = res
  g_out = jnp.where(ok[..., None], cotangents[0], 0.0)
  g_lse = jnp.where(ok, cotangents[1], 0.0)
  kern = _kernel(plan_, interpret)
  zeros = jnp.zeros(v.shape[:-1] + (1,), v.dtype)
  residuals = (q, k, jnp.concatenate([v, zeros], -1), sk.SegmentIds(q_seg, k_seg), None,
               jnp.concatenate([out, -g_lse[..., None]], -1), lse, kern.dq_mask_info,
               kern.dkv_mask_info)
  d_out = jnp.concatenate([g_out, jnp.ones_like(g_lse)[..., None]], -1).astype(v.dtype)
  kw = kern.kwargs
  grads = sk._splash_attention_bwd(  # noqa: SLF001 (see the module docstring)
      False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"], None, kw["mask_function"],
      kw["attn_logits_soft_cap"], interpret, residuals, d_out)
  dq, dk, dv = grads[3:6]
  return dq, dk, dv[..., :-1], None, None


_splash.defvjp(_splash_fwd, _splash_bwd)


def attend(q, k, v, plan_: Plan, *, k_valid, q_segment, k_segment, scale: float,
           interpret: bool):
  """``kernel.attend`` through splash: ``q [b, lq, h, d]``, ``k [b, lk, h, d]``,
  ``v [b, lk, h, dv]``, ``k_valid [b, (h,) lk]``; returns ``out [b, h, lq, dv]`` float32
  and ``lse [b, h, lq]`` (zeros and ``NEG`` for a query with no allowed key)."""
  b, lq, h, _ = q.shape
  lk = k.shape[1]

  def heads_first(x):  # [b, l, h, e] -> [b, h, l padded to TILE, e]
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, -x.shape[2] % TILE), (0, 0)))

  if q_segment is None:
    q_seg = jnp.zeros((b, lq), jnp.int32)
    k_seg = jnp.zeros((b, lk), jnp.int32)
  else:
    q_seg, k_seg = (jnp.asarray(x, jnp.int32) for x in (q_segment, k_segment))
  valid = jnp.asarray(k_valid, bool)
  if q_seg.ndim == 3 or k_seg.ndim == 3 or valid.ndim == 3:
    raise ValueError("kernel: implementation='splash' takes padding and segments per "
                     "example, not per head")
  # Padding keys get a segment no query has.
  k_seg = jnp.where(valid, k_seg, jnp.min(q_seg, axis=1, keepdims=True) - 1)
  q_seg = jnp.pad(q_seg, ((0, 0), (0, -lq % TILE)))
  k_seg = jnp.pad(k_seg, ((0, 0), (0, -lk % TILE)),
                  constant_values=jnp.iinfo(jnp.int32).min)
  qs = heads_first((q * scale).astype(q.dtype))
  out, lse = _sharded(plan_, interpret, qs, heads_first(k), heads_first(v), q_seg, k_seg)
  return out[:, :, :lq], lse[:, :, :lq]


def _sharded(plan_, interpret, q, k, v, q_seg, k_seg):
  """The kernel over the batch (vmapped), per device under the context's mesh: Pallas
  TPU kernels are not partitioned automatically, so a ``shard_map`` splits the batch and
  the heads as the logical-axis rules shard them (heads only when all share one mask)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return jax.vmap(functools.partial(_splash, plan_, interpret))(q, k, v, q_seg, k_seg)
  batch, heads = nn.logical_to_mesh_axes((axes.BATCH, axes.HEADS))
  if heads is not None and len(set(plan_.masks)) > 1:
    heads = None
  shards = math.prod(mesh.shape[a] for a in ((heads,) if isinstance(heads, str) else heads or ()))
  local = dataclasses.replace(plan_, masks=plan_.masks[:len(plan_.masks) // shards])
  x, seg = P(batch, heads), P(batch)
  return jax.shard_map(jax.vmap(functools.partial(_splash, local, interpret)), mesh=mesh,
                       in_specs=(x, x, x, seg, seg), out_specs=(x, x), check_vma=False)(
                           q, k, v, q_seg, k_seg)

"""One block-sparse attention kernel for every pattern family.

A family describes *which key blocks each query block visits* (a ``Layout``) and, inside
the visited blocks, which (query, key) pairs are allowed (key padding, causality, an
optional position ``rule``, optional segment ids; optionally a logit bias from per-token
integers). The kernel computes the exact softmax
over the allowed pairs with an online softmax over the visited blocks (Rabe & Staats,
2021; FlashAttention, Dao et al., 2022) and a ``custom_vjp`` backward that recomputes the
probabilities from the saved log-sum-exp, so forward and backward keep O(length * block)
temporaries whatever the pattern. Time is proportional to the visited blocks.

Two kinds of layout:

* **static** (``Layout.from_blocks``, a numpy ``[nq, nk]`` block matrix known when
  tracing; ``full`` and ``band`` build the common ones). The visited pairs are scheduled
  into steps of *lanes*: in each step every lane processes one (query block, key block)
  pair, and no query block appears twice in a step. Rows with few blocks share a lane
  (a causal triangle packs query block ``i`` with ``nq - 1 - i``), so the work is the
  visited pairs, not ``nq`` times the longest row.
* **dynamic** (``Layout.from_table``, traced ``[batch, heads, nq, slots]`` key block ids
  with a validity flag per slot, e.g. BigBird's random blocks drawn from each example's
  extent): one lane per query block, one step per slot.

Both run as nested ``lax.scan``s (chunks of lanes, then steps; forward and backward), each
step a batched matmul over ~``STEP_BYTES`` of scores; XLA therefore keeps one step's
scores alive at a time.

The layout is the seam for accelerator kernels: ``implementation`` selects the backend,
``"xla"`` (this file, any device), ``"pallas"`` (``flash``: one fused program per query
block, Triton on a GPU), both driven by the same layout and element rules (``tiles``), or
``"splash"`` (``splash``: TPU splash attention over the element mask the layout, the
causality and the rule make, for calls that can be written as one mask per head).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from effx.attention import flash, tiles
from effx.attention.core import NEG, pad_axis

f32 = jnp.float32
IMPLEMENTATIONS = ("auto", "xla", "pallas", "splash")
BACKENDS = ("xla", "pallas", "splash")  # what a family on this kernel runs on
DYNAMIC_BACKENDS = ("xla", "pallas")  # what one with per-example layouts runs on
_BACKEND = contextvars.ContextVar("effx_kernel_backend", default="auto")


@contextlib.contextmanager
def backend(implementation: str):
  """``attend`` calls traced inside the block that give no ``implementation`` use this
  one (how a family module passes its ``implementation`` option to every kernel call
  it makes)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"kernel: implementation={implementation!r} is not available; "
                     f"available: {', '.join(map(repr, IMPLEMENTATIONS))}")
  token = _BACKEND.set(implementation)
  try:
    yield
  finally:
    _BACKEND.reset(token)


_PLATFORM = contextvars.ContextVar("effx_kernel_platform", default=None)


@contextlib.contextmanager
def platform(name: str):
  """Attention traced inside the block is for devices of ``name`` (``"cpu"``, ``"gpu"``,
  ``"tpu"``), not JAX's default backend: how a program compiled ahead of time for a TPU
  topology on another machine picks splash, and runs no kernel in interpret mode."""
  if name not in ("cpu", "gpu", "tpu"):
    raise ValueError(f"kernel.platform: {name!r} is not one of 'cpu', 'gpu', 'tpu'")
  token = _PLATFORM.set(name)
  try:
    yield
  finally:
    _PLATFORM.reset(token)


def target_platform() -> str:
  """The innermost ``platform`` block's name, else JAX's default backend."""
  return _PLATFORM.get() or jax.default_backend()


_SEEN = contextvars.ContextVar("effx_kernel_seen", default=None)


@contextlib.contextmanager
def recording():
  """Yields a set that collects the backend of every attention call traced inside the
  block (``"xla"``, ``"pallas"``, ``"splash"``, ``"cudnn"``; on a TPU, ``"xla (...)"``
  with the reason where ``"auto"`` could not use splash): how a training run learns and
  records what ``"auto"`` chose."""
  seen = set()
  token = _SEEN.set(seen)
  try:
    yield seen
  finally:
    _SEEN.reset(token)


def note(chosen: str) -> None:
  """Records ``chosen`` in the innermost ``recording`` block, if any."""
  seen = _SEEN.get()
  if seen is not None:
    seen.add(chosen)


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """Which key blocks each query block visits, as a schedule of steps x lanes.

  Build with ``from_blocks`` (static), ``from_table`` (dynamic), ``full`` or ``band``.

  Attributes:
    block_q, block_k: query and key block lengths.
    num_q, num_k: number of query and key blocks.
    k_ids: key block of each (step, lane): numpy ``[steps, lanes]`` (static) or a traced
      ``[steps, batch | 1, heads | 1, lanes]`` (dynamic).
    valid: bool, same shape: False entries do their work but add nothing.
    q_ids: static layouts that pack rows: numpy ``[steps, lanes]`` query block of each
      entry; None when lane ``i`` is query block ``i``.
  """
  block_q: int
  block_k: int
  num_q: int
  num_k: int
  k_ids: np.ndarray | jax.Array
  valid: np.ndarray | jax.Array
  q_ids: np.ndarray | None = None

  @property
  def static(self) -> bool:
    return isinstance(self.k_ids, np.ndarray)

  @classmethod
  def from_blocks(cls, blocks: np.ndarray, block_q: int, block_k: int) -> Layout:
    """A static layout from a boolean ``[num_q, num_k]`` matrix of visited block pairs."""
    blocks = np.asarray(blocks, bool)
    if blocks.ndim != 2:
      raise ValueError(f"Layout.from_blocks: blocks must be [num_q, num_k], got {blocks.shape}")
    nq, nk = blocks.shape
    rows = [np.nonzero(r)[0] for r in blocks]
    steps = max([len(r) for r in rows] + [1])
    lanes = _pack(rows, steps)
    if len(lanes) > 0.9 * nq:  # packing saves little: one lane per query block, no gathers
      lanes, packed = [[i] for i in range(nq)], False
    else:
      packed = True
    q_ids = np.zeros((steps, len(lanes)), np.int32)
    k_ids = np.zeros((steps, len(lanes)), np.int32)
    valid = np.zeros((steps, len(lanes)), bool)
    for lane, members in enumerate(lanes):
      pairs = [(i, j) for i in members for j in rows[i]]
      q_ids[:, lane] = members[-1]  # padding entries stay on the lane's own query block
      for t, (i, j) in enumerate(pairs):
        q_ids[t, lane], k_ids[t, lane], valid[t, lane] = i, j, True
    return cls(block_q, block_k, nq, nk, k_ids, valid, q_ids if packed else None)

  @classmethod
  def from_table(cls, table: jax.Array, valid: jax.Array, block_q: int, block_k: int,
                 num_k: int) -> Layout:
    """A dynamic layout: ``table[b, h, i, s]`` is the key block query block ``i`` visits
    in slot ``s`` (``valid`` False: visit nothing); no key block may appear twice among a
    query block's valid slots (it would be counted twice)."""
    table = jnp.asarray(table, jnp.int32)
    if table.ndim != 4 or jnp.shape(valid) != table.shape:
      raise ValueError(f"Layout.from_table: table and valid must be [batch, heads, num_q, "
                       f"slots] of one shape, got {table.shape} and {jnp.shape(valid)}")
    return cls(block_q, block_k, table.shape[2], num_k, jnp.moveaxis(table, -1, 0),
               jnp.moveaxis(jnp.asarray(valid, bool), -1, 0))

  @classmethod
  def full(cls, q_len: int, k_len: int, block_q: int, block_k: int, *,
           causal: bool = False) -> Layout:
    """Every key block; with ``causal``, only key blocks that start at or before the
    query block's last position (queries and keys at the same positions)."""
    nq, nk = -(-q_len // block_q), -(-k_len // block_k)
    blocks = np.ones((nq, nk), bool)
    if causal:
      last_q = np.minimum((np.arange(nq) + 1) * block_q, q_len) - 1
      blocks = (np.arange(nk) * block_k)[None, :] <= last_q[:, None]
    return cls.from_blocks(blocks, block_q, block_k)

  @classmethod
  def band(cls, length: int, block: int, before: int, after: int) -> Layout:
    """Blocks that hold a key ``j`` with ``i - before <= j <= i + after`` for some query
    ``i`` of the block (queries and keys at the same positions, one block size)."""
    return cls.from_blocks(tiles.band_blocks(length, block, before, after), block, block)

  def blocks(self) -> np.ndarray:
    """Static layouts: the boolean ``[num_q, num_k]`` matrix of visited block pairs."""
    if not self.static:
      raise ValueError("Layout.blocks: a dynamic layout has no static block matrix")
    out = np.zeros((self.num_q, self.num_k), bool)
    q_ids = (np.broadcast_to(np.arange(self.num_q), self.k_ids.shape) if self.q_ids is None
             else self.q_ids)
    out[q_ids[self.valid], self.k_ids[self.valid]] = True
    return out

  def rows(self):
    """For each query block, the key blocks it visits: ``(table [B, H, num_q, slots],
    counts [B, H, num_q])`` int32, the visited ids first in each row (``B``, ``H`` are 1
    for static layouts and for dynamic ones that share a table across batch or heads).
    Static layouts give numpy arrays."""
    if self.static:
      blocks = self.blocks()
      counts = blocks.sum(axis=1).astype(np.int32)
      table = np.zeros((self.num_q, max(1, int(counts.max(initial=0)))), np.int32)
      for i, row in enumerate(blocks):
        table[i, :counts[i]] = np.nonzero(row)[0]
      return table[None, None], counts[None, None]
    table = jnp.moveaxis(self.k_ids, 0, -1)  # [B, H, num_q, slots]
    valid = jnp.moveaxis(self.valid, 0, -1)
    order = jnp.argsort(~valid, axis=-1, stable=True)
    return (jnp.take_along_axis(table, order, axis=-1),
            jnp.sum(valid, axis=-1, dtype=jnp.int32))

  def columns(self):
    """The transpose of ``rows``: for each key block, the query blocks that visit it,
    ``(table [B, H, num_k, slots], counts [B, H, num_k])`` (a backward pass over key
    blocks reads it)."""
    if self.static:
      blocks = self.blocks().T
      counts = blocks.sum(axis=1).astype(np.int32)
      table = np.zeros((self.num_k, max(1, int(counts.max(initial=0)))), np.int32)
      for j, column in enumerate(blocks):
        table[j, :counts[j]] = np.nonzero(column)[0]
      return table[None, None], counts[None, None]
    table, counts = self.rows()
    slots = table.shape[-1]
    # Entries sorted by key block (invalid ones last, as block num_k); entry e belongs to
    # query block e // slots. No key block repeats within a row, so a column holds at
    # most num_q entries.
    keys = jnp.where(jnp.arange(slots) < counts[..., None], table, self.num_k)
    keys = keys.reshape(keys.shape[:2] + (-1,))
    order = jnp.argsort(keys, axis=-1, stable=True)
    per_key = jax.vmap(jax.vmap(lambda k: jnp.bincount(k, length=self.num_k + 1)))(keys)
    per_key = per_key[..., :self.num_k].astype(jnp.int32)
    start = jnp.cumsum(per_key, axis=-1) - per_key
    at = jnp.minimum(start[..., None] + jnp.arange(self.num_q), keys.shape[-1] - 1)
    table = jnp.take_along_axis(order // slots, at.reshape(at.shape[:2] + (-1,)), axis=-1)
    return table.reshape(at.shape).astype(jnp.int32), per_key

  def work_fraction(self) -> float:
    """Block pairs the kernel computes (visited ones and padding entries) / all pairs."""
    steps, lanes = self.k_ids.shape[0], self.k_ids.shape[-1]
    return steps * lanes / (self.num_q * self.num_k)


def _pack(rows, capacity):
  """First-fit decreasing: query blocks into lanes of at most ``capacity`` key blocks."""
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
  lanes, room = [], []
  for i in order:
    need = len(rows[i])
    for lane, free in enumerate(room):
      if need <= free:
        lanes[lane].append(i)
        room[lane] -= need
        break
    else:
      lanes.append([i])
      room.append(capacity - need)
  return lanes


# ----------------------------------------------------------------------------- public API


def attend(q: jax.Array, k: jax.Array, v: jax.Array, layout: Layout, *, q_pos: jax.Array,
           k_pos: jax.Array, k_valid: jax.Array, causal: bool = False,
           rule: Callable | None = None, q_segment: jax.Array | None = None,
           k_segment: jax.Array | None = None, bias: Callable | None = None,
           q_info: jax.Array | None = None, k_info: jax.Array | None = None,
           scale: float | None = None, implementation: str | None = None
           ) -> tuple[jax.Array, jax.Array]:
  """Exact softmax attention over the allowed pairs of the visited blocks.

  Query ``i`` attends key ``j`` iff ``j``'s block is visited by ``i``'s block, the key is
  valid, ``k_pos[j] <= q_pos[i]`` when ``causal``, ``rule(q_pos[i], k_pos[j])`` holds and
  the segments are equal (when given). Every (query, key) pair must lie in at most one
  visited block pair, which every layout guarantees.

  Args:
    q: ``[batch, q_len, heads, d]``.
    k: ``[batch, k_len, heads, d]``.
    v: ``[batch, k_len, heads, dv]``.
    layout: the visited blocks (``num_q = ceil(q_len / block_q)`` and
      ``num_k = ceil(k_len / block_k)``; lengths are padded to whole blocks internally).
    q_pos, k_pos: ``[batch | 1, q_len]`` / ``[batch | 1, k_len]`` integer positions
      (1: the same in every example), or ``[batch, heads, length]`` when they differ per
      head (sorted families).
    k_valid: ``[batch, k_len]`` (or ``[batch, heads, k_len]``) bool, False for padding.
    causal: allow only ``k_pos <= q_pos``.
    rule: optional hashable callable ``(q_pos, k_pos) -> bool`` on broadcast arrays.
    q_segment, k_segment: optional integer ids shaped like the positions; a pair is
      allowed only within one segment (LSH buckets, documents).
    bias: optional hashable callable ``(q_info, k_info) -> float`` added to the logits
      of allowed pairs (``q_info[..., :, None, :]``, ``k_info[..., None, :, :]``); no
      gradient flows into it (LSH's duplicate correction).
    q_info, k_info: integer ``[batch, (heads,) length, features]`` for ``bias``.
    scale: logit scale, default ``d ** -0.5``.
    implementation: ``"xla"`` (nested scans of batched matmuls, any device),
      ``"pallas"`` (``flash``: one fused program per query block; Triton on a GPU,
      interpret mode elsewhere), ``"splash"`` (``splash``: TPU splash attention over one
      element mask per head; interpret mode elsewhere; raises for a call it cannot
      express: a per-example layout, a bias, positions computed at run time) or
      ``"auto"``: splash on a TPU where it can express the call, pallas on a GPU when
      the blocks make Triton tiles, else xla (see ``resolve``). Default: the innermost
      ``backend`` block's, else ``"auto"``.

  Returns:
    ``out [batch, q_len, heads, dv]`` float32 (zeros for a query with no allowed key) and
    ``lse [batch, q_len, heads]`` float32 (``NEG`` for such a query).
  """
  b, lq, h, d = q.shape
  lk = k.shape[1]
  if layout.num_q != -(-lq // layout.block_q) or layout.num_k != -(-lk // layout.block_k):
    raise ValueError(f"kernel: layout of {layout.num_q} x {layout.num_k} blocks of "
                     f"{layout.block_q} x {layout.block_k} does not fit q_len={lq}, "
                     f"k_len={lk}")
  if (q_segment is None) != (k_segment is None):
    raise ValueError("kernel: give both q_segment and k_segment, or neither")
  if (bias is None) != (q_info is None) or (q_info is None) != (k_info is None):
    raise ValueError("kernel: bias needs q_info and k_info, and they need bias")
  scale = d ** -0.5 if scale is None else float(scale)

  def heads_first(x, block, fill=0):  # [b, l, h, e] -> [b, h, n, block, e]
    x = pad_axis(jnp.swapaxes(x, 1, 2), block, axis=2, value=fill)
    return x.reshape(x.shape[0], x.shape[1], -1, block, x.shape[-1])

  def per_position(x, block, fill, dtype, features=False):
    # [b, (h,) l, (f)] -> [b, 1 | h, n, block, (f)]
    if x is None:
      return None
    x = _compact(x, dtype)
    x = x[:, None] if x.ndim == 2 + features else x
    x = pad_axis(x, block, axis=2, value=fill)
    return x.reshape(x.shape[:2] + (-1, block) + x.shape[3:])

  bq, bk = layout.block_q, layout.block_k
  pos = ((per_position(q_pos, bq, 0, jnp.int32), per_position(q_segment, bq, -1, jnp.int32),
          per_position(q_info, bq, 0, jnp.int32, features=True)),
         (per_position(k_pos, bk, 0, jnp.int32), per_position(k_valid, bk, False, bool),
          per_position(k_segment, bk, -2, jnp.int32),
          per_position(k_info, bk, 0, jnp.int32, features=True)))
  asked = _BACKEND.get() if implementation is None else implementation
  target = target_platform()
  plan = None
  if asked == "splash" or (asked == "auto" and target == "tpu"):
    # Imported here: jax's TPU Pallas modules add ~0.2 s to every process start.
    from effx.attention import splash  # noqa: PLC0415
    plan = splash.plan(layout, q_pos, k_pos, heads=h, causal=bool(causal), rule=rule,
                       bias=bias)
    if asked == "auto" and isinstance(plan, splash.Plan) and (
        plan.padding() > splash.AUTO_PADDING):
      # Short sequences (sparse's residues, global rows) would mostly be padding.
      plan = (f"its sequences of {min(plan.q_len, plan.k_len)} tokens would run padded "
              f"to {splash.TILE}")
  chosen = resolve(asked, layout, target, splash=plan)
  note(f"xla (no splash: {plan})" if isinstance(plan, str) and asked == "auto" else chosen)
  if chosen == "splash":
    out, lse = splash.attend(q, k, v, plan, k_valid=k_valid, q_segment=q_segment,
                             k_segment=k_segment, scale=scale, interpret=target != "tpu")
    return jnp.swapaxes(out, 1, 2), jnp.swapaxes(lse, 1, 2)
  if chosen == "xla":
    ids = (jnp.asarray(layout.k_ids), jnp.asarray(layout.valid),
           None if layout.q_ids is None else jnp.asarray(layout.q_ids))
    out, lse = _attend(heads_first(q, bq), heads_first(k, bk), heads_first(v, bk), pos,
                       ids, _Static(bool(causal), rule, bias, scale))
  else:
    out, lse = _pallas(heads_first(q, bq), heads_first(k, bk), heads_first(v, bk), pos,
                       layout, flash.Static(bool(causal), rule, bias, scale, bq, bk,
                                            interpret=target != "gpu"))
  out = out.reshape(b, h, -1, out.shape[-1])[:, :, :lq]
  lse = lse.reshape(b, h, -1)[:, :, :lq]
  return jnp.swapaxes(out, 1, 2), jnp.swapaxes(lse, 1, 2)


def _compact(x, dtype):
  """``x`` as a jax array; numpy positions equal in every example (the usual ``arange``)
  become one broadcast row, not a ``[batch, length]`` constant in the program."""
  if isinstance(x, np.ndarray) and x.ndim >= 2 and (x == x[:1]).all():
    return jnp.broadcast_to(jnp.asarray(x[:1], dtype), x.shape)
  return jnp.asarray(x, dtype)


def resolve(implementation: str, layout: Layout, platform: str | None = None, *,
            splash=None) -> str:
  """The backend ``attend`` runs for ``implementation`` on ``platform`` (default:
  ``target_platform()``): ``"xla"``, ``"pallas"`` or ``"splash"``. ``splash`` is the call's
  ``splash.plan`` (a plan, or the reason there is none). Asked for explicitly, a backend
  that cannot run the call raises, saying why; ``"auto"`` then runs xla."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"kernel: implementation={implementation!r} is not available; "
                     f"available: {', '.join(map(repr, IMPLEMENTATIONS))}")
  platform = platform or target_platform()
  problem = flash.tile_problem(layout.block_q, layout.block_k)
  if implementation == "pallas" and platform == "gpu" and problem:
    raise ValueError(f"kernel: implementation='pallas' on a GPU cannot run this layout "
                     f"({problem}); use implementation='xla' or other block sizes")
  if implementation == "splash" and isinstance(splash, str):
    raise ValueError(f"kernel: implementation='splash' cannot run this call: {splash}; "
                     f"use implementation='xla' or 'pallas'")
  if implementation == "auto":
    if platform == "tpu":
      return "splash" if splash is not None and not isinstance(splash, str) else "xla"
    return "pallas" if platform == "gpu" and not problem else "xla"
  return implementation


def _pallas(qb, kb, vb, pos, layout, static):
  """``attend`` through ``flash``: blocks ``[b, h, n, block, e]`` and the per-block
  metadata flattened back to ``[b, h, length(, features)]``; returns blocked outputs."""
  b, h, nq, bq, _ = qb.shape

  def flat(x):
    return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])

  def per_head(x):
    if x is None:
      return None
    x = flat(x)
    x = x.astype(jnp.int32) if x.dtype == bool else x  # Triton loads no booleans
    return jnp.broadcast_to(x, (b, h) + x.shape[2:])

  tables = tuple(tuple(jnp.broadcast_to(jnp.asarray(x), (b, h) + x.shape[2:]) for x in pair)
                 for pair in (layout.rows(), layout.columns()))
  meta = jax.tree.map(per_head, pos)
  q = flat((qb * static.scale).astype(qb.dtype))
  out, lse = flash.attend(q, flat(kb), flat(vb), meta, tables, static)
  return out.reshape(b, h, nq, bq, -1), lse.reshape(b, h, nq, bq)


# ----------------------------------------------------------------------------- the kernel


@dataclasses.dataclass(frozen=True)
class _Static:
  causal: bool
  rule: Callable | None
  bias: Callable | None
  scale: float


def _logits(static, qi, kj, qmeta, kmeta, ok):
  """Scores ``[b, h, lanes, bq, bk]`` of one step (bias added) and the allow-mask
  ``[b, 1 | h, lanes, bq, bk]``, from the query side's ``(pos, segment, info)`` and the
  key side's ``(pos, valid, segment, info)`` per block (``[b, 1 | h, lanes, block]``)."""
  allowed = tiles.allowed(static, qmeta, kmeta) & ok[..., None, None]
  s = _scores(qi, kj)
  if static.bias is not None:
    s = s + tiles.bias(static, qmeta, kmeta)
  return s, allowed


def _scores(qi, kj):
  """``[b, h, lanes, bq, d] x [b, h, lanes, bk, d] -> [b, h, lanes, bq, bk]``."""
  return jnp.einsum("bhnqd,bhnkd->bhnqk", qi, kj, preferred_element_type=f32)


def _pv(p, vj):
  """``[b, h, lanes, bq, bk] x [b, h, lanes, bk, dv] -> [b, h, lanes, bq, dv]``."""
  return jnp.einsum("bhnqk,bhnkd->bhnqd", p, vj.astype(f32))


def _to_keys(p, x):
  """``p^T x``: ``[b, h, lanes, bq, bk] x [b, h, lanes, bq, e] -> [b, h, lanes, bk, e]``."""
  # This operand order is ~1.4x faster on CPU than "bhnqk,bhnqd->bhnkd".
  return jnp.einsum("bhnqd,bhnqk->bhnkd", x, p)


def _take(x, ids):
  """Blocks of ``x [b | 1, 1 | h, n, ...]`` at ``ids``: ``[lanes]`` (static) or
  ``[b | 1, h | 1, lanes]`` (dynamic) -> ``[b | 1, 1 | h, lanes, ...]`` (dynamic: the
  batch and heads of both)."""
  if x is None:
    return None
  if ids.ndim == 1:
    return jnp.take(x, ids, axis=2)
  # broadcast_shapes, not max(): a symbolic batch (jax.export) has no order against 1.
  lead = jnp.broadcast_shapes(x.shape[:2], ids.shape[:2])
  x = jnp.broadcast_to(x, lead + x.shape[2:])
  ids = jnp.broadcast_to(ids, lead + ids.shape[2:])
  return jnp.take_along_axis(x, ids.reshape(ids.shape + (1,) * (x.ndim - 3)), axis=2)


def _add(x, ids, y):
  """``x[blocks at ids] += y`` (repeated ids add up)."""
  if ids.ndim == 1:
    return x.at[:, :, ids].add(y)
  b, h = y.shape[:2]
  ids = jnp.broadcast_to(ids, (b, h, ids.shape[-1]))
  return x.at[jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], ids].add(y)


def _online_update(state, s, allowed, vj):
  m, den, acc = state
  s = jnp.where(allowed, s, -jnp.inf)  # m >= NEG is finite, so exp(-inf - m) = 0
  m_new = jnp.maximum(m, jnp.max(s, axis=-1))
  p = jnp.exp(s - m_new[..., None])
  corr = jnp.exp(m - m_new)
  return m_new, den * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + _pv(p, vj)




# Lanes per step: enough for large batched matmuls, few enough that one step's scores
# (about this many bytes) stay in cache. 8 lanes of 12 heads x 128 x 128 (~6 MiB) were 1.4x
# faster than 32 lanes on a 2-core CPU.
STEP_BYTES = 8 << 20


def _lane_chunks(ids, b, h, bq, bk, nq):
  """Splits the lanes into ``g`` chunks of ``c`` (padding with empty lanes).

  Returns ``(xs, g, c)``: ``xs = (k_ids, valid, q_ids | None)`` with a leading chunk axis
  and steps second (``[g, steps, (b', h',) c]``). Padding lanes of packed layouts point at
  a dummy query block ``nq``; with one lane per query block, lanes ``nq..g*c-1`` are dummy
  query blocks.
  """
  k_ids, valid, q_ids = ids
  lanes = k_ids.shape[-1]
  # The chunk count is a static scan length, and a symbolic batch (jax.export serving any
  # batch) has no size to divide by: chunks are then sized for one example, so a step
  # holds about STEP_BYTES of scores per example.
  per_step = b if isinstance(b, int) else 1
  c = int(max(1, min(lanes, STEP_BYTES // (per_step * h * bq * bk * 4))))
  g = -(-lanes // c)

  def split(x, fill):
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, g * c - lanes)], constant_values=fill)
    return jnp.moveaxis(x.reshape(x.shape[:-1] + (g, c)), -2, 0)

  return (split(k_ids, 0), split(valid, False),
          None if q_ids is None else split(q_ids, nq)), g, c


def _pad_blocks(x, n):
  """Pads the block axis (2) of ``x`` to ``n`` blocks (None stays None)."""
  if x is None:
    return None
  return jnp.pad(x, [(0, 0), (0, 0), (0, n - x.shape[2])] + [(0, 0)] * (x.ndim - 3))


def _lanes(x, start, c):
  return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, c, axis=2)


def _keys(kb, vb, kmeta, kid):
  return _take(kb, kid), _take(vb, kid), tuple(_take(x, kid) for x in kmeta)


def _finish(m, den, acc):
  safe = jnp.where(den > 0, den, 1.0)
  return acc / safe[..., None], jnp.where(den > 0, m + jnp.log(safe), NEG)


def _forward(qb, kb, vb, pos, ids, static):
  qmeta, kmeta = pos
  b, h, nq, bq, _ = qb.shape
  dv = vb.shape[-1]
  xs, g, c = _lane_chunks(ids, b, h, bq, kb.shape[3], nq)
  qs = (qb * static.scale).astype(qb.dtype)

  def empty(n):
    return (jnp.full((b, h, n, bq), NEG, f32), jnp.zeros((b, h, n, bq), f32),
            jnp.zeros((b, h, n, bq, dv), f32))

  def update(state, qi, qm, kid, ok):
    kj, vj, km = _keys(kb, vb, kmeta, kid)
    s, allowed = _logits(static, qi, kj, qm, km, ok)
    return _online_update(state, s, allowed, vj)

  if xs[2] is None:  # one lane per query block: each chunk keeps its own state
    side = jax.tree.map(lambda x: _pad_blocks(x, g * c), (qs, qmeta))

    def chunk(_, x):
      start, (kid, ok, _) = x
      qi, qm = jax.tree.map(lambda y: _lanes(y, start, c), side)

      def step(state, y):
        return update(state, qi, qm, *y), None

      state, _ = jax.lax.scan(step, empty(c), (kid, ok))
      return None, _finish(*state)

    _, (out, lse) = jax.lax.scan(chunk, None, (jnp.arange(g) * c, xs))
    out = jnp.moveaxis(out, 0, 2).reshape(b, h, g * c, bq, dv)[:, :, :nq]
    return out, jnp.moveaxis(lse, 0, 2).reshape(b, h, g * c, bq)[:, :, :nq]

  # Packed lanes: query blocks move between lanes, so the state is global (+ a dummy block).
  side = jax.tree.map(lambda x: _pad_blocks(x, nq + 1), (qs, qmeta))

  def packed_step(state, y):
    kid, ok, qid = y
    part = update(tuple(_take(x, qid) for x in state),
                  *jax.tree.map(lambda x: _take(x, qid), side), kid, ok)
    return tuple(x.at[:, :, qid].set(p) for x, p in zip(state, part)), None

  def packed_chunk(state, x):
    return jax.lax.scan(packed_step, state, x)[0], None

  state, _ = jax.lax.scan(packed_chunk, empty(nq + 1), xs)
  out, lse = _finish(*state)
  return out[:, :, :nq], lse[:, :, :nq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(qb, kb, vb, pos, ids, static):
  return _forward(qb, kb, vb, pos, ids, static)


def _attend_fwd(qb, kb, vb, pos, ids, static):
  out, lse = _forward(qb, kb, vb, pos, ids, static)
  return (out, lse), (qb, kb, vb, pos, ids, out, lse)


def _attend_bwd(static, res, cotangents):
  qb, kb, vb, pos, ids, out, lse = res
  qmeta, kmeta = pos
  d_out, d_lse = cotangents
  b, h, nq, bq, d = qb.shape
  xs, g, c = _lane_chunks(ids, b, h, bq, kb.shape[3], nq)
  qs = (qb * static.scale).astype(f32)
  # dS = P * (dP - delta): delta = rowsum(dO * O) from the softmax Jacobian, minus the lse
  # cotangent because d lse / d s = P.
  delta = jnp.sum(d_out * out, axis=-1) - d_lse

  def grads(qi, doi, lsei, deli, qm, kid, ok):
    kj, vj, km = _keys(kb, vb, kmeta, kid)
    s, allowed = _logits(static, qi, kj, qm, km, ok)
    # s <= lse on allowed pairs; the clamp only guards rows padded to whole blocks.
    p = jnp.where(allowed, jnp.exp(jnp.minimum(s - lsei[..., None], 0.0)), 0.0)
    dv_j = _to_keys(p, doi)
    ds = p * (_scores(doi, vj.astype(f32)) - deli[..., None])
    return _pv(ds, kj), _to_keys(ds, qi), dv_j

  zeros_kv = (jnp.zeros(kb.shape, f32), jnp.zeros(vb.shape, f32))
  if xs[2] is None:  # one lane per query block: dq of a chunk stays in the chunk
    side = jax.tree.map(lambda x: _pad_blocks(x, g * c), (qs, d_out, lse, delta, qmeta))

    def chunk(carry, x):
      start, (kid, ok, _) = x
      q_side = jax.tree.map(lambda y: _lanes(y, start, c), side)

      def step(carry, y):
        dq, dk, dv = carry
        dq_i, dk_j, dv_j = grads(*q_side, *y)
        return (dq + dq_i, _add(dk, y[0], dk_j), _add(dv, y[0], dv_j)), None

      (dq, dk, dv), _ = jax.lax.scan(step, (jnp.zeros((b, h, c, bq, d), f32), *carry),
                                     (kid, ok))
      return (dk, dv), dq

    (dk, dv), dq = jax.lax.scan(chunk, zeros_kv, (jnp.arange(g) * c, xs))
    dq = jnp.moveaxis(dq, 0, 2).reshape(b, h, g * c, bq, d)[:, :, :nq]
  else:
    side = jax.tree.map(lambda x: _pad_blocks(x, nq + 1), (qs, d_out, lse, delta, qmeta))

    def packed_step(carry, y):
      dq, dk, dv = carry
      kid, ok, qid = y
      dq_i, dk_j, dv_j = grads(*jax.tree.map(lambda x: _take(x, qid), side), kid, ok)
      return (dq.at[:, :, qid].add(dq_i), _add(dk, kid, dk_j), _add(dv, kid, dv_j)), None

    def packed_chunk(carry, x):
      return jax.lax.scan(packed_step, carry, x)[0], None

    (dq, dk, dv), _ = jax.lax.scan(
        packed_chunk, (jnp.zeros((b, h, nq + 1, bq, d), f32), *zeros_kv), xs)
    dq = dq[:, :, :nq]
  dq = dq * static.scale
  return (dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype),
          jax.tree.map(lambda _: None, pos), jax.tree.map(lambda _: None, ids))


_attend.defvjp(_attend_fwd, _attend_bwd)

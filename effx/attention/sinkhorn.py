"""Sparse Sinkhorn attention (Tay et al., 2020).

The sequence is cut into blocks of ``block_size``. A small sorting network reads a
summary of every block (the mean of its real keys) and scores how strongly each query
block should pull in each key block: ``R = W2 relu(W1 s_i + b1) + b2`` (weights shared by
the heads). ``sinkhorn_iters`` rounds of alternating row/column normalisation in log
space, at temperature ``temperature`` (with Gumbel noise in training when
``gumbel_noise``), turn ``exp(R)`` into a (nearly) doubly stochastic soft permutation
``P``. Block ``i``'s "sorted" keys and values are ``sum_j P_ij K_j`` and
``sum_j P_ij V_j``; each query block attends to its own block and its sorted block in one
softmax, through the block-sparse kernel (``kernel.attend`` over the keys followed by the
sorted keys: two visited blocks per query block). Cost O(length * block_size +
(length / block_size)^2).

Causal: block ``i`` may only pull in blocks ``j < i``, is summarised by the mean of all
keys before it, and its local block is causally masked; block 0 has no sorted block. The
paper's "causal Sinkhorn balancing" also normalises the masked columns, but a column
mixes the scores of later query blocks, whose summaries hold later tokens: later keys
would then shape earlier outputs, a leak a causal language model can learn to exploit.
Here causal balancing normalises rows only, so every output depends on earlier-or-equal
positions alone (queries, keys and values), which the tests check.

Padding: padded keys and values are zeroed before pooling and mixing; a sorted slot is
masked when no real key contributes to it. Only the blocks up to an example's last real
token are sorted (the balancing runs over that square), so trailing padding changes no
real output.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effx.attention import kernel
from effx.attention.base import Family, check_positive, check_qkv, zero_padded_queries
from effx.attention.core import NEG, extents, pad_axis
from effx.attention.registry import register

f32 = jnp.float32


def log_sinkhorn(logits: jax.Array, allowed: jax.Array, iters: int,
                 columns: bool = True) -> jax.Array:
  """Alternating row/column log-normalisation of ``logits [..., n, n]`` over ``allowed``
  entries (rows only when ``columns`` is False); returns the normalised log-matrix
  (``NEG`` where not allowed)."""
  x = jnp.where(allowed, logits, NEG)
  for _ in range(iters if columns else 1):
    x = jnp.where(allowed, x - jax.nn.logsumexp(x, axis=-1, keepdims=True), NEG)
    if columns:
      x = jnp.where(allowed, x - jax.nn.logsumexp(x, axis=-2, keepdims=True), NEG)
  return x


@register("sinkhorn")
class SinkhornAttention(Family):
  """Sparse Sinkhorn attention with a learned block-sorting network.

  Attributes:
    block_size: block length (default 64); other lengths are padded to whole blocks.
    sinkhorn_iters: normalisation rounds (default 8).
    temperature: Sinkhorn temperature (default 0.75).
    gumbel_noise: add Gumbel noise to the sorting logits in training calls (draws from
      the ``"dropout"`` RNG stream; default False).
    max_len: longest supported input; the sorting network scores
      ``max_len // block_size`` blocks (default 4096).
    param_dtype: dtype of the sorting network's parameters.
  """

  # splash: its key validity differs per head (a sorted slot is real where real keys
  # feed it).
  backends = kernel.DYNAMIC_BACKENDS

  block_size: int = 64
  sinkhorn_iters: int = 8
  temperature: float = 0.75
  gumbel_noise: bool = False
  max_len: int = 4096
  param_dtype: jnp.dtype = jnp.float32

  def check_options(self):
    check_positive("sinkhorn", "block_size", self.block_size)
    check_positive("sinkhorn", "sinkhorn_iters", self.sinkhorn_iters)
    check_positive("sinkhorn", "max_len", self.max_len)
    if not self.temperature > 0:
      raise ValueError(f"sinkhorn: option temperature={self.temperature!r} must be > 0")

  @nn.compact
  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    mask = check_qkv("sinkhorn", q, k, v, mask)
    b, length, heads, d = q.shape
    bs = self.block_size
    n = -(-length // bs)
    max_blocks = -(-self.max_len // bs)
    if n > max_blocks:
      raise ValueError(
          f"sinkhorn: input length {length} needs {n} blocks but option max_len="
          f"{self.max_len} allows {max_blocks}")
    valid = jnp.ones((b, length), bool) if mask is None else mask
    valid = pad_axis(valid, bs, axis=1, value=False).reshape(b, n, bs)
    keep = valid[..., None, None].astype(f32)

    def blocks(x):
      return pad_axis(x.astype(f32), bs, axis=1).reshape(b, n, bs, heads, x.shape[-1])

    qb, kb, vb = blocks(q), blocks(k) * keep, blocks(v) * keep   # [b, n, bs, h, d]
    # Block summaries: mean of real keys (causal: of all keys in earlier blocks).
    sums, counts = jnp.sum(kb, axis=2), jnp.sum(keep, axis=2)    # [b, n, h, d], [b, n, 1, 1]
    if self.causal:
      sums = jnp.cumsum(sums, axis=1) - sums
      counts = jnp.cumsum(counts, axis=1) - counts
    summary = sums / jnp.maximum(counts, 1.0)
    hidden = nn.relu(nn.Dense(d, dtype=f32, param_dtype=self.param_dtype, name="sort_hidden",
                              kernel_init=nn.with_logical_partitioning(
                                  nn.initializers.lecun_normal(), ("kv", None)))(summary))
    logits = nn.Dense(max_blocks, dtype=f32, param_dtype=self.param_dtype, name="sort_out",
                      kernel_init=nn.with_logical_partitioning(
                          nn.initializers.lecun_normal(), (None, None)))(hidden)
    logits = jnp.swapaxes(logits[..., :n], 1, 2)                # [b, h, n_query, n_key]
    if self.gumbel_noise and not deterministic:
      u = jax.random.uniform(self.make_rng("dropout"), logits.shape, minval=1e-6, maxval=1.0)
      logits = logits - jnp.log(-jnp.log(u))
    # Only blocks up to each example's last real token take part in the sorting, so
    # trailing padding blocks change no real output (their count would shift the column
    # normalisation).
    real_blocks = -(-extents(b, length, mask) // bs)             # [b]
    live = jnp.arange(n)[None, :] < real_blocks[:, None]        # [b, n]
    allowed = live[:, None, :, None] & live[:, None, None, :]     # [b, 1, n, n]
    if self.causal:
      allowed = allowed & jnp.tri(n, k=-1, dtype=bool)
    sort = jnp.exp(log_sinkhorn(logits / self.temperature, allowed, self.sinkhorn_iters,
                                columns=not self.causal))
    sort = jnp.where(allowed, sort, 0.0)
    sorted_k = jnp.einsum("bhij,bjthd->bithd", sort, kb)        # [b, n, bs, h, d]
    sorted_v = jnp.einsum("bhij,bjthd->bithd", sort, vb)
    # A sorted slot is real if some real key feeds it: [b, h, n, bs].
    sorted_valid = jnp.einsum("bhij,bjt->bhit", sort, valid.astype(f32)) > 0
    # One kernel call over the keys followed by the sorted keys: query block i visits
    # key block i (causally masked when causal) and sorted block n + i, whose slots sit
    # just before block i (position i * bs - 1), so causality never masks them.
    flat = lambda x: x.reshape(b, n * bs, heads, x.shape[-1])  # noqa: E731
    blocks_visited = np.concatenate([np.eye(n, dtype=bool)] * 2, axis=1)
    layout = kernel.Layout.from_blocks(blocks_visited, bs, bs)
    # One row of positions for every example (numpy has no symbolic batch).
    pos = np.arange(n * bs, dtype=np.int32)[None, :]
    sorted_pos = np.repeat(np.arange(n, dtype=np.int32) * bs - 1, bs)[None, :]
    key_valid = jnp.concatenate([jnp.broadcast_to(valid.reshape(b, 1, n * bs),
                                                  (b, heads, n * bs)),
                                 sorted_valid.reshape(b, heads, n * bs)], axis=-1)
    with kernel.backend(self.implementation):
      out, _ = kernel.attend(flat(qb), jnp.concatenate([flat(kb), flat(sorted_k)], axis=1),
                             jnp.concatenate([flat(vb), flat(sorted_v)], axis=1), layout,
                             q_pos=pos, k_pos=np.concatenate([pos, sorted_pos], axis=1),
                             k_valid=key_valid, causal=self.causal, scale=d ** -0.5)
    out = out.reshape(b, n * bs, heads, v.shape[-1])[:, :length]
    return zero_padded_queries(out.astype(q.dtype), mask)

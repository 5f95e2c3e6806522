"""Routing attention (Roy et al., 2021, "Efficient Content-Based Sparse Attention with
Routing Transformers").

Queries and keys are unit-normalised and routed to ``num_clusters`` shared centroids.
For balanced clusters each centroid takes its ``window`` nearest queries and its
``window`` nearest keys (top-k, as in the paper); a cluster's queries attend to that
cluster's keys. The attention costs O(num_clusters * window^2) per head: with the
defaults, a fixed window of 128 and ``ceil(length / window)`` clusters (fixed when the
module is initialised, from the length it is initialised with), that is linear in the
length and every token can be routed. Each cluster's gathered queries attend to its
gathered keys through the block-sparse kernel (a block-diagonal layout of
``window``-token blocks, positions per head). Counting the clusters a query and a key
share (for the exact softmax over the union) reads a bitset of each token's clusters
(``ceil(clusters / 32)`` int32 words, O(length^2 / (32 window)) per head) in the kernel's
logit bias. The paper's choice of about sqrt(length) clusters of
sqrt(length) tokens (O(length^1.5)) is ``num_clusters=w, window=w`` with ``w ~ sqrt(n)``.
Padded tokens rank after every real one in each top-k, so trailing padding changes no
real output. A query picked by several clusters gets the exact softmax over the union
of their keys (each logit lowered by ``log`` of how many of its clusters share the key, as
for LSH rounds); every token also attends to itself, so a token no cluster picks still
sees its own value (a small extension: the paper's model relied on local heads for that).

The centroids are not trained by gradients: they live in the ``"state"`` collection and,
in training calls (``deterministic=False`` with ``"state"`` mutable), move towards the
mean of the normalised queries and keys nearest to them by an exponential moving average
(decay ``ema_decay``, 0.999 in the paper), then are renormalised.

Causal: the routing looks at every token, so later tokens can change which earlier keys
an earlier query sees; a later token's value never reaches an earlier output.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effx.attention import kernel
from effx.attention.base import Family, check_positive, check_qkv, zero_padded_queries
from effx.attention.core import NEG, NotSelf, merge
from effx.attention.registry import register


def _unit(x):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


DEFAULT_WINDOW = 128


def default_clusters(length: int, window: int) -> int:
  """Clusters that let every one of ``length`` tokens be routed: ``ceil(length / window)``."""
  return max(1, -(-length // window))


def _route(x, valid, centroids, window):
  """Indices ``[b, h, clusters, window]`` of the tokens nearest to each centroid."""
  sims = jnp.einsum("blhd,hcd->bhcl", _unit(x), centroids)
  # Padding ranks last whatever its content (ties resolve by position).
  sims = jnp.where(valid[:, None, None, :], sims, NEG)
  return jax.lax.top_k(sims, window)[1]


def _membership(idx, length):
  """``[b, h, length, clusters]`` float: 1 where the token is in the cluster."""
  b, h, c, w = idx.shape
  one = jnp.zeros((b, h, c, length), jnp.float32)
  bi, hi, ci = jnp.meshgrid(jnp.arange(b), jnp.arange(h), jnp.arange(c), indexing="ij")
  one = one.at[bi[..., None], hi[..., None], ci[..., None], idx].set(1.0)
  return jnp.swapaxes(one, 2, 3)


def _cluster_bits(idx, length):
  """``[b, h, length, ceil(clusters / 32)]`` int32: bit ``c % 32`` of word ``c // 32``
  set where the token is in cluster ``c`` (a bitset: 32x smaller than ``_membership``)."""
  b, h, c, w = idx.shape
  words = -(-c // 32)
  bits = jnp.zeros((b, h, length, words), jnp.int32)
  bi, hi, ci = jnp.meshgrid(jnp.arange(b), jnp.arange(h), jnp.arange(c), indexing="ij")
  word = jnp.broadcast_to((ci // 32)[..., None], idx.shape)
  # A token is picked at most once per cluster: adding distinct bits sets them (the
  # wrap-around of bit 31 included).
  bit = jnp.left_shift(jnp.int32(1), (ci % 32).astype(jnp.int32))[..., None]
  return bits.at[bi[..., None], hi[..., None], idx, word].add(
      jnp.broadcast_to(bit, idx.shape))


@dataclasses.dataclass(frozen=True)
class SharedClusters:
  """Logit bias ``-log N_ij``: ``N_ij`` the number of clusters that picked query ``i`` as a
  query and key ``j`` as a key, from the tokens' cluster bitsets (``_cluster_bits``), so
  that the merged softmax counts each key once."""

  def __call__(self, q_bits, k_bits):
    count = jnp.sum(jax.lax.population_count(q_bits & k_bits), axis=-1)
    return -jnp.log(jnp.maximum(count, 1).astype(jnp.float32))


def routing_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, centroids: jax.Array,
                      mask: jax.Array | None = None, causal: bool = False,
                      window: int = DEFAULT_WINDOW) -> jax.Array:
  """Routing attention for given centroids.

  Each cluster's queries and keys are gathered into one block of ``window`` queries and
  one of ``window`` keys; the block-sparse kernel (``kernel.attend``) attends each
  query block to its own key block (a block-diagonal layout) with positions per head,
  causality, ``i != j`` (the self term is added after), and the shared-cluster count as
  its logit bias.

  Args:
    q, k: ``[batch, length, heads, head_dim]``; v: ``[batch, length, heads, head_dim_v]``.
    centroids: ``[heads, num_clusters, head_dim]`` unit vectors.
    mask: optional ``[batch, length]`` padding mask (True = real token).
    causal: no attention to later positions.
    window: queries and keys per cluster (capped at the length).

  Returns:
    ``[batch, length, heads, head_dim_v]`` in ``q``'s dtype; zeros at padded queries.
  """
  mask = check_qkv("routing", q, k, v, mask)
  b, length, h, d = q.shape
  dv = v.shape[-1]
  c = centroids.shape[1]
  w = min(length, window)
  valid = jnp.ones((b, length), bool) if mask is None else mask
  qi = _route(q, valid, centroids, w)                        # [b, h, c, w]
  ki = _route(k, valid, centroids, w)

  def gather(x, idx):  # [b, l, h, e] -> [b, c * w, h, e], each head its own tokens
    x = jnp.take_along_axis(jnp.swapaxes(x, 1, 2), idx.reshape(b, h, -1, 1), axis=2)
    return jnp.swapaxes(x, 1, 2)

  def per_head(x, idx):  # [b, h, length, ...] -> [b, h, c * w, ...]
    flat = idx.reshape(b, h, -1)
    return jnp.take_along_axis(x, flat.reshape(flat.shape + (1,) * (x.ndim - 3)), axis=2)

  q_bits, k_bits = _cluster_bits(qi, length), _cluster_bits(ki, length)
  layout = kernel.Layout.from_blocks(np.eye(c, dtype=bool), w, w)
  out, lse = kernel.attend(
      gather(q, qi), gather(k, ki), gather(v, ki), layout, q_pos=qi.reshape(b, h, -1),
      k_pos=ki.reshape(b, h, -1),
      k_valid=per_head(jnp.broadcast_to(valid[:, None], (b, h, length)), ki),
      causal=causal, rule=NotSelf(), bias=SharedClusters(), q_info=per_head(q_bits, qi),
      k_info=per_head(k_bits, ki), scale=d ** -0.5)
  out = jnp.swapaxes(out, 1, 2)                              # [b, h, c*w, dv]
  lse = jnp.swapaxes(lse, 1, 2)
  # Scatter-merge the clusters' partial softmaxes onto the query positions.
  seg = (jnp.arange(b * h).reshape(b, h, 1) * length + qi.reshape(b, h, -1)).reshape(-1)
  n = b * h * length
  top = jax.lax.stop_gradient(jax.ops.segment_max(lse.reshape(-1), seg, num_segments=n))
  weight = jnp.exp(lse.reshape(-1) - top[seg])
  total = jax.ops.segment_sum(weight, seg, num_segments=n)
  acc = jax.ops.segment_sum(weight[:, None] * out.reshape(-1, dv), seg, num_segments=n)
  picked = total > 0
  routed = jnp.where(picked[:, None], acc / jnp.where(picked, total, 1.0)[:, None], 0.0)
  routed_lse = jnp.where(picked & (top > NEG / 2), top + jnp.log(jnp.where(picked, total, 1.0)),
                         NEG)
  routed = routed.reshape(b, h, length, dv)
  routed_lse = routed_lse.reshape(b, h, length)
  # Every token also sees itself.
  qh, kh, vh = (jnp.swapaxes(x, 1, 2).astype(jnp.float32) for x in (q, k, v))
  self_lse = jnp.sum(qh * kh, axis=-1) * d ** -0.5
  out, _ = merge([(routed, routed_lse), (vh, self_lse)])
  return zero_padded_queries(jnp.swapaxes(out, 1, 2).astype(q.dtype), mask)


def routing_allow_matrix(q, k, *, centroids, mask=None, causal=False, window=DEFAULT_WINDOW):
  """``[batch, heads, length, length]`` allow-matrix that ``routing_attention`` computes."""
  b, length = q.shape[:2]
  valid = jnp.ones((b, length), bool) if mask is None else mask.astype(bool)
  w = min(length, window)
  mq = _membership(_route(q, valid, centroids, w), length)
  mk = _membership(_route(k, valid, centroids, w), length)
  meet = jnp.einsum("bhqc,bhkc->bhqk", mq, mk) > 0
  allowed = (meet | jnp.eye(length, dtype=bool)) & valid[:, None, None, :]
  return allowed & jnp.tri(length, dtype=bool) if causal else allowed


def update_centroids(centroids, q, k, mask, decay):
  """One EMA step of the shared centroids towards their assigned queries and keys."""
  b, length = q.shape[:2]
  valid = jnp.ones((b, length), bool) if mask is None else mask
  x = jnp.concatenate([_unit(q), _unit(k)], axis=1)          # [b, 2l, h, d]
  valid = jnp.concatenate([valid, valid], axis=1).astype(jnp.float32)
  nearest = jnp.argmax(jnp.einsum("blhd,hcd->blhc", x, centroids), axis=-1)
  onehot = jax.nn.one_hot(nearest, centroids.shape[1]) * valid[:, :, None, None]
  sums = jnp.einsum("blhc,blhd->hcd", onehot, x)
  counts = jnp.sum(onehot, axis=(0, 1))[..., None]            # [h, c, 1]
  means = sums / jnp.maximum(counts, 1.0)
  moved = _unit(decay * centroids + (1 - decay) * means)
  return jax.lax.stop_gradient(jnp.where(counts > 0, moved, centroids))


def _check(num_clusters, window, ema_decay):
  check_positive("routing", "num_clusters", num_clusters, allow_none=True)
  check_positive("routing", "window", window)
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"routing: option ema_decay={ema_decay!r} must be in [0, 1)")


@register("routing")
class RoutingAttention(Family):
  """Routing Transformer attention with EMA k-means centroids (``"state"`` collection).

  Attributes:
    num_clusters: number of centroids, shared by queries and keys; default (None)
      ``ceil(length / window)`` for the length the module is initialised with (the
      trainer initialises with the task's length), so that every token can be routed.
      The centroids' shape fixes it afterwards.
    window: queries and keys per cluster (default 128). The attention costs
      ``num_clusters * window^2`` per head (see the module docstring for the shared-
      cluster count).
    ema_decay: centroid moving-average decay (default 0.999).
  """

  pattern_kind = "content"
  derived_defaults = {"num_clusters": "ceil(length / window), at initialisation"}
  mutable_state = True
  backends = kernel.DYNAMIC_BACKENDS  # splash: its tokens are routed per example

  num_clusters: int | None = None
  window: int = DEFAULT_WINDOW
  ema_decay: float = 0.999

  def check_options(self):
    _check(self.num_clusters, self.window, self.ema_decay)

  def _centroids(self, shape):
    _, length, heads, head_dim = shape
    clusters = self.num_clusters or default_clusters(length, self.window)
    return self.variable(
        "state", "centroids",
        lambda: _unit(jax.random.normal(self.make_rng("params"), (heads, clusters, head_dim))))

  @nn.compact
  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    mask = check_qkv("routing", q, k, v, mask)
    centroids = self._centroids(q.shape)
    with kernel.backend(self.implementation):
      out = routing_attention(q, k, v, centroids=centroids.value, mask=mask,
                              causal=self.causal, window=self.window)
    if not deterministic and self.is_mutable_collection("state") and not self.is_initializing():
      centroids.value = update_centroids(centroids.value, q, k, mask, self.ema_decay)
    return out

  @nn.compact
  def allow_matrix(self, q, k, *, mask=None):
    """``[batch, heads, length, length]`` pattern for these inputs (call via ``apply``)."""
    centroids = self._centroids(q.shape)
    return routing_allow_matrix(q, k, centroids=centroids.value, mask=mask, causal=self.causal,
                                window=self.window)

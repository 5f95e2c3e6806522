"""Performer attention, FAVOR+ (Choromanski et al., 2021).

Positive orthogonal random features approximate the softmax kernel:
``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)`` with ``x = q / d^(1/4)`` (or ``k``), so that
``E[phi(q) . phi(k)] = exp(q . k / sqrt(d))``. ``W``'s rows are orthogonal within blocks of
``d`` (QR of a Gaussian matrix) and rescaled by chi-distributed norms so that each row is
marginally Gaussian. A ReLU kernel (``phi(x) = relu(W x) / sqrt(m) + 1e-3``) is the
generalised-attention option. Attention is then linear in length
(``effx.attention.linear.feature_attention``), causal by chunked prefix sums.

The error against softmax attention falls as ``num_features`` grows
(``tests/attention/test_approximate.py`` shows it for 16 -> 256 -> 1024 features).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effx.attention.base import (Family, check_choice, check_positive, check_qkv,
                                 zero_padded_queries)
from effx.attention.linear import feature_attention
from effx.attention.randomness import family_key
from effx.attention.registry import register

KERNELS = ("softmax", "relu")
RELU_EPSILON = 1e-3


def draw_features(key: jax.Array, num_features: int, head_dim: int,
                  orthogonal: bool = True) -> jax.Array:
  """Random projection ``[num_features, head_dim]``: orthogonal blocks with Gaussian row
  norms (``orthogonal=True``) or i.i.d. Gaussian rows."""
  if not orthogonal:
    return jax.random.normal(key, (num_features, head_dim), jnp.float32)
  blocks_key, norms_key = jax.random.split(key)
  n_blocks = -(-num_features // head_dim)
  gauss = jax.random.normal(blocks_key, (n_blocks, head_dim, head_dim), jnp.float32)
  q, r = jnp.linalg.qr(gauss)
  # QR fixes the signs of R's diagonal, which biases Q's directions; undoing it makes each
  # column uniform on the sphere (Haar), as the unbiased FAVOR+ estimator requires.
  q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
  rows = jnp.swapaxes(q, 1, 2).reshape(-1, head_dim)[:num_features]
  norms = jnp.linalg.norm(jax.random.normal(norms_key, (num_features, head_dim)), axis=-1)
  return rows * norms[:, None]


def favor_features(x: jax.Array, projection: jax.Array, *, kernel: str, is_query: bool,
                   mask: jax.Array | None = None) -> jax.Array:
  """FAVOR+ feature map ``[batch, length, heads, num_features]`` of ``x``.

  The softmax features subtract a stabiliser before ``exp``: per token for queries, per
  (batch, head) over real tokens for keys. Both cancel exactly in the attention ratio.
  """
  x = x.astype(jnp.float32) * x.shape[-1] ** -0.25
  m = projection.shape[0]
  proj = jnp.einsum("blhd,md->blhm", x, projection)
  if kernel == "relu":
    return jax.nn.relu(proj) * m ** -0.5 + RELU_EPSILON
  logits = proj - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
  if is_query:
    stab = jnp.max(logits, axis=-1, keepdims=True)
  else:
    real = logits if mask is None else jnp.where(mask[:, :, None, None], logits, -jnp.inf)
    stab = jnp.max(real, axis=(1, 3), keepdims=True)
    stab = jnp.where(jnp.isfinite(stab), stab, 0.0)
  return jnp.exp(logits - jax.lax.stop_gradient(stab)) * m ** -0.5


def performer_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, projection: jax.Array,
                        mask: jax.Array | None = None, causal: bool = False,
                        kernel: str = "softmax", chunk_size: int = 128) -> jax.Array:
  """FAVOR+ attention for a given random projection.

  Args:
    q, k: ``[batch, length, heads, head_dim]``; v: ``[batch, length, heads, head_dim_v]``.
    projection: ``[num_features, head_dim]`` from ``draw_features``.
    mask: optional ``[batch, length]`` padding mask (True = real token).
    causal: prefix-sum attention, chunked by ``chunk_size``.
    kernel: ``"softmax"`` (FAVOR+) or ``"relu"``.

  Returns:
    ``[batch, length, heads, head_dim_v]`` in ``q``'s dtype; zeros at padded queries.
  """
  mask = check_qkv("performer", q, k, v, mask)
  check_choice("performer", "kernel", kernel, KERNELS)
  phi_q = favor_features(q, projection, kernel=kernel, is_query=True)
  phi_k = favor_features(k, projection, kernel=kernel, is_query=False, mask=mask)
  out = feature_attention(phi_q, phi_k, v, mask=mask, causal=causal, chunk_size=chunk_size)
  return zero_padded_queries(out.astype(q.dtype), mask)


@register("performer")
class PerformerAttention(Family):
  """FAVOR+ random-feature attention.

  Attributes:
    num_features: random features ``m`` (default 256).
    kernel: ``"softmax"`` (default) or ``"relu"``.
    orthogonal: orthogonal random features (default True).
    redraw: draw new features on every training call (default False: the layer's fixed
      draw, see ``effx.attention.randomness``); evaluation always uses the fixed draw.
    seed: seed of the fixed draw.
    chunk_size: chunk length of causal prefix sums (default 128).
  """

  num_features: int = 256
  kernel: str = "softmax"
  orthogonal: bool = True
  redraw: bool = False
  seed: int = 0
  chunk_size: int = 128

  def check_options(self):
    check_positive("performer", "num_features", self.num_features)
    check_choice("performer", "kernel", self.kernel, KERNELS)
    check_positive("performer", "chunk_size", self.chunk_size)

  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    key = family_key(self, seed=self.seed, redraw=self.redraw, deterministic=deterministic)
    projection = draw_features(key, self.num_features, q.shape[-1], self.orthogonal)
    return performer_attention(q, k, v, projection=projection, mask=mask, causal=self.causal,
                               kernel=self.kernel, chunk_size=self.chunk_size)

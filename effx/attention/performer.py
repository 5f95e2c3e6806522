"""Performer attention, FAVOR+ (Choromanski et al., 2021).

Positive orthogonal random features approximate the softmax kernel:
``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)`` with ``x = q / d^(1/4)`` (or ``k``), so that
``E[phi(q) . phi(k)] = exp(q . k / sqrt(d))``. ``W``'s rows are orthogonal within blocks of
``d`` (QR of a Gaussian matrix) and rescaled by chi-distributed norms so that each row is
marginally Gaussian. A ReLU kernel (``phi(x) = relu(W x) / sqrt(m) + 1e-3``) is the
generalised-attention option. Attention is then linear in length
(``effx.attention.linear.feature_attention``), causal by chunked prefix sums.

Numerics: each token's features are kept in ``[0, 1]`` with their magnitude carried as a
log scale, and every query is normalised by the largest scale among the keys it may see
(``feature_attention``), whose division keeps gradients exact without squaring a tiny
denominator; a denominator below 1e-30 counts as zero, and ``epsilon`` keeps every
denominator above that. At large inputs (entries of std 10 and 20, head_dim 64) outputs
and gradients stay finite, no row is zeroed, and a causal output depends on no later
key. An earlier version shifted all keys by one maximum over the whole sequence: a large
later key could underflow every earlier output to zero, causality broke from std 5, and
gradients were NaN from std 3.

The error against softmax attention falls as ``num_features`` grows
(``tests/attention/test_approximate.py`` shows it for 16 -> 256 -> 1024 features).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effx.attention import decoding
from effx.attention.base import Family, check_choice, check_positive, check_qkv, zero_padded_queries
from effx.attention.linear import feature_attention
from effx.attention.randomness import family_key
from effx.attention.registry import register

KERNELS = ("softmax", "relu")
RELU_EPSILON = 1e-3
DEFAULT_EPSILON = 1e-6


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


def favor_features(x: jax.Array, projection: jax.Array, *, kernel: str,
                   epsilon: float = DEFAULT_EPSILON) -> tuple[jax.Array, jax.Array | None]:
  """FAVOR+ features of ``x [batch, length, heads, head_dim]``, split into a bounded part
  and a per-token log scale.

  Softmax kernel: with ``x' = x / d^(1/4)`` and ``l_m = w_m . x' - |x'|^2 / 2``, the paper's
  feature ``exp(l_m) / sqrt(m)`` is returned as ``phi_m = exp(l_m - a) + epsilon`` with
  ``a = max_m l_m`` and log scale ``a`` (the constant ``1 / sqrt(m)`` cancels in attention
  and is dropped). ``phi`` lies in ``[epsilon, 1 + epsilon]`` with its largest entry
  ``1 + epsilon``, so its products do not overflow. ``epsilon > 0`` (google-research's
  FAVOR+ adds 1e-6 too, relative to one maximum over all keys rather than each key's)
  bounds denominators away from zero at the price of a bias towards uniform weights; 0
  is the paper's estimator. ReLU kernel:
  ``relu(w . x') / sqrt(m) + 1e-3`` and no log scale (``None``).

  Returns:
    ``(phi [batch, length, heads, num_features], log_scale [batch, length, heads] | None)``,
    float32.
  """
  x = x.astype(jnp.float32) * x.shape[-1] ** -0.25
  m = projection.shape[0]
  proj = jnp.einsum("blhd,md->blhm", x, projection)
  if kernel == "relu":
    return jax.nn.relu(proj) * m ** -0.5 + RELU_EPSILON, None
  logits = proj - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
  top = jnp.max(logits, axis=-1)
  return jnp.exp(logits - top[..., None]) + epsilon, top


def performer_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, projection: jax.Array,
                        mask: jax.Array | None = None, causal: bool = False,
                        kernel: str = "softmax", chunk_size: int = 128,
                        epsilon: float = DEFAULT_EPSILON) -> jax.Array:
  """FAVOR+ attention for a given random projection.

  Query ``i`` weighs key ``j`` by ``phi(q_i) . phi(k_j)`` (``favor_features``; a query's
  own log scale cancels). Each query's normaliser shifts only by keys it may see, so a
  causal output depends on earlier positions alone at any input scale.

  Args:
    q, k: ``[batch, length, heads, head_dim]``; v: ``[batch, length, heads, head_dim_v]``.
    projection: ``[num_features, head_dim]`` from ``draw_features``.
    mask: optional ``[batch, length]`` padding mask (True = real token).
    causal: prefix-sum attention, chunked by ``chunk_size``.
    kernel: ``"softmax"`` (FAVOR+) or ``"relu"``.
    epsilon: added to every softmax feature (see ``favor_features``).

  Returns:
    ``[batch, length, heads, head_dim_v]`` in ``q``'s dtype; zeros at padded queries.
  """
  mask = check_qkv("performer", q, k, v, mask)
  check_choice("performer", "kernel", kernel, KERNELS)
  phi_q, _ = favor_features(q, projection, kernel=kernel, epsilon=epsilon)
  phi_k, log_scale = favor_features(k, projection, kernel=kernel, epsilon=epsilon)
  out = feature_attention(phi_q, phi_k, v, mask=mask, causal=causal, chunk_size=chunk_size,
                          k_log_scale=log_scale)
  return zero_padded_queries(out.astype(q.dtype), mask)


@register("performer")
class PerformerAttention(Family):
  """FAVOR+ random-feature attention.

  Attributes:
    num_features: random features ``m`` (default 256).
    kernel: ``"softmax"`` (default) or ``"relu"``.
    orthogonal: orthogonal random features (default True).
    redraw: draw new features on every training call (default True, as in the paper and
      google-research's implementation: a fixed draw lets training fit the draw's
      errors); evaluation always uses the layer's fixed draw
      (``effx.attention.randomness``).
    seed: seed of the fixed draw.
    chunk_size: chunk length of causal prefix sums (default 128).
    epsilon: added to every (normalised) softmax feature (default 1e-6, as
      google-research's implementation): every denominator stays positive, at the price
      of moving unit-scale outputs by ~1e-4 and pulling large-scale ones towards uniform
      weights. 0 is the paper's estimator exactly; then, at q, k entries of std 10 (head
      dim 64), a few percent of queries have a denominator below 1e-30 and output zeros.
  """

  decodable = True

  num_features: int = 256
  kernel: str = "softmax"
  orthogonal: bool = True
  redraw: bool = True
  seed: int = 0
  chunk_size: int = 128
  epsilon: float = DEFAULT_EPSILON

  def check_options(self):
    check_positive("performer", "num_features", self.num_features)
    check_choice("performer", "kernel", self.kernel, KERNELS)
    check_positive("performer", "chunk_size", self.chunk_size)
    if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) or not (
        0 <= self.epsilon < 1):
      raise ValueError(f"performer: option epsilon={self.epsilon!r} must be a number in [0, 1)")

  def __call__(self, q, k, v, *, mask=None, deterministic=True):
    key = family_key(self, seed=self.seed, redraw=self.redraw, deterministic=deterministic)
    projection = draw_features(key, self.num_features, q.shape[-1], self.orthogonal)
    return performer_attention(q, k, v, projection=projection, mask=mask, causal=self.causal,
                               kernel=self.kernel, chunk_size=self.chunk_size,
                               epsilon=self.epsilon)

  def decode_init(self, batch, heads, head_dim, head_dim_v, capacity, dtype=jnp.float32):
    """Running sums over ``num_features`` features (and the keys' largest log scale)."""
    del capacity, dtype
    return decoding.sums_init(batch, heads, self.num_features, head_dim_v)

  def decode_step(self, q, k, v, state, position, valid):
    del position  # the layer's fixed draw, as in evaluation
    key = family_key(self, seed=self.seed, redraw=self.redraw, deterministic=True)
    projection = draw_features(key, self.num_features, q.shape[-1], self.orthogonal)
    phi_q, _ = favor_features(q[:, None], projection, kernel=self.kernel, epsilon=self.epsilon)
    phi_k, scale = favor_features(k[:, None], projection, kernel=self.kernel,
                                  epsilon=self.epsilon)
    out, state = decoding.sums_step(phi_q[:, 0], phi_k[:, 0], v, state, valid,
                                    None if scale is None else scale[:, 0])
    return out.astype(q.dtype), state

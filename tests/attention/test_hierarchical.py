"""Hierarchical attention (H-Transformer-1D) against the paper's equations written afresh
here: the level at which each pair meets, the coarse logits (means of the tile's
queries and keys over real tokens; causal: the group's first query), one softmax over
all real keys; outputs and gradients, padding, causality, ragged lengths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effx.attention as ea


def _levels(length, nr):
  """``[L, L]``: the finest level whose coarse blocks of the two positions are equal or
  adjacent (paper, Section 5: diagonal and neighbouring blocks at every level)."""
  block = np.arange(length) // nr
  out = np.full((length, length), -1)
  level = 0
  while (out < 0).any():
    near = np.abs(block[:, None] // 2 ** level - block[None, :] // 2 ** level) <= 1
    out[(out < 0) & near] = level
    level += 1
  return out


def _oracle(q, k, v, valid, nr, causal):
  """Softmax over real (and, when causal, earlier) keys of the tile-mean logits."""
  b, length, h, d = q.shape
  levels = _levels(length, nr)
  real = valid.astype(jnp.float32)
  logits = jnp.zeros((b, h, length, length))
  for level in range(levels.max() + 1):
    group = np.arange(length) // 2 ** level
    member = (group[:, None] == group[None, :])[None] * real[:, None, :]   # [b, L, L]
    mean = member / jnp.maximum(member.sum(-1, keepdims=True), 1.0)
    kbar = jnp.einsum("bij,bjhd->bihd", mean, k)
    qbar = q[:, group * 2 ** level] if causal else jnp.einsum("bij,bjhd->bihd", mean, q)
    s = jnp.einsum("bihd,bjhd->bhij", qbar, kbar) / np.sqrt(d)
    logits = logits + jnp.where(levels == level, s, 0.0)
  allowed = valid[:, None, None, :]
  if causal:
    allowed = allowed & np.tri(length, dtype=bool)
  p = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
  out = jnp.einsum("bhij,bjhd->bihd", jnp.where(allowed, p, 0.0), v)
  return out * valid[:, :, None, None]


@pytest.mark.parametrize("length,nr,causal", [(37, 4, False), (37, 4, True), (64, 8, False),
                                               (50, 2, True)])
def test_equals_the_papers_equations(length, nr, causal):
  """float32, a padded example, outputs and the q, k, v gradients of
  ``sum(out * cos(out))`` within 2e-5 of the largest value."""
  rng = np.random.default_rng(length + nr)
  q, k, v = (jnp.asarray(rng.normal(size=(2, length, 2, 6)), jnp.float32) for _ in range(3))
  valid = jnp.asarray(np.arange(length)[None, :] < np.array([[length], [length // 2]]))
  module = ea.make("hierarchical", causal=causal, block_size=nr)

  def loss(f):
    def inner(q, k, v):
      out = f(q, k, v)
      return jnp.sum(out * jnp.cos(out)), out
    return jax.value_and_grad(inner, (0, 1, 2), has_aux=True)

  @jax.jit
  def both(q, k, v):
    return (loss(lambda *a: module.apply({}, *a, mask=valid))(q, k, v),
            loss(lambda *a: _oracle(*a, valid, nr, causal))(q, k, v))

  ((_, got), got_grads), ((_, want), want_grads) = both(q, k, v)
  scale = float(jnp.abs(want).max())
  np.testing.assert_allclose(got, want, atol=2e-5 * scale)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=2e-5 * float(jnp.abs(w).max()))


def test_short_sequences_are_dense_attention():
  """Within two blocks every pair meets at level 0: exact attention."""
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 32, 2, 8)), jnp.float32) for _ in range(3))
  for causal in (False, True):
    got = ea.make("hierarchical", causal=causal, block_size=16).apply({}, q, k, v)
    np.testing.assert_allclose(got, ea.reference(q, k, v, causal=causal), atol=1e-5)


def test_which_positions_meet_at_which_level():
  """The level picture for 16 tokens in blocks of 2 (rows: query pairs): exact near the
  diagonal, then coarser; every pair exactly once; causal keeps the past."""
  module = ea.make("hierarchical", block_size=2)
  levels = module.level_matrix(16)
  want = ["0000111122222222", "0000001122222222", "1100000011112222", "1111000000112222",
          "2222110000001111", "2222111100000011", "2222222211000000", "2222222211110000"]
  assert ["".join(map(str, levels[2 * i])) for i in range(8)] == want
  np.testing.assert_array_equal(levels[::2], levels[1::2])
  causal = ea.make("hierarchical", causal=True, block_size=2).level_matrix(16)
  np.testing.assert_array_equal(causal >= 0, np.tri(16, dtype=bool))
  np.testing.assert_array_equal(np.where(causal >= 0, causal, levels), levels)


def test_bad_block_size_is_one_clear_message():
  for bad in (0, 3, 2.0):
    with pytest.raises(ValueError, match=f"block_size={bad!r} must be an even integer"):
      ea.make("hierarchical", block_size=bad)

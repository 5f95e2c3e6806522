"""Approximate families: error against softmax attention shrinks with their budget, and
each equals its own closed form."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effx.attention as ea
from support import padding_mask, qkv
from effx.attention import cosformer, linear, performer, sinkhorn


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _closed_form(phi_q, phi_k, v, mask, causal):
  """Kernelised attention written as the explicit quadratic product."""
  length = v.shape[1]
  scores = jnp.einsum("bqhm,bkhm->bhqk", phi_q, phi_k)
  allowed = mask[:, None, None, :] & (jnp.tri(length, dtype=bool) if causal else True)
  scores = jnp.where(allowed, scores, 0.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", scores, v) / jnp.swapaxes(scores.sum(-1), 1, 2)[..., None]
  return out * mask[:, :, None, None]


@pytest.mark.parametrize("causal", [False, True])
def test_linear_equals_closed_form(causal):
  q, k, v = qkv()
  mask = padding_mask()
  out = linear.linear_attention(q, k, v, mask=mask, causal=causal, chunk_size=8)
  want = _closed_form(linear.elu_features(q), linear.elu_features(k), v, mask, causal)
  np.testing.assert_allclose(out, want, atol=1e-5)


@pytest.mark.parametrize("max_len", [None, 50])
@pytest.mark.parametrize("causal", [False, True])
def test_cosformer_equals_the_papers_quadratic_form(causal, max_len):
  """s_ij = relu(q_i).relu(k_j) cos(pi/2 (i-j)/M), written out over all pairs, with M the
  last real position + 1 of each example (or max_len)."""
  q, k, v = qkv()
  mask = padding_mask()
  out = cosformer.cosformer_attention(q, k, v, mask=mask, causal=causal, max_len=max_len,
                                      chunk_size=8)
  length = q.shape[1]
  horizon = (jnp.full(2, max_len, jnp.float32) if max_len else
             mask.sum(axis=1).astype(jnp.float32))  # padding_mask pads at the end
  i = jnp.arange(length)
  weight = jnp.cos(jnp.pi / 2 * (i[:, None] - i[None, :]) / horizon[:, None, None])
  scores = jnp.einsum("bqhd,bkhd->bhqk", jax.nn.relu(q), jax.nn.relu(k)) * weight[:, None]
  allowed = mask[:, None, None, :] & (jnp.tri(length, dtype=bool) if causal else True)
  scores = jnp.where(allowed, scores, 0.0)
  den = jnp.swapaxes(scores.sum(-1), 1, 2)[..., None]
  # A query with no positive coordinate meets no key: defined as zero output.
  num = jnp.einsum("bhqk,bkhd->bqhd", scores, v)
  want = jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0)
  assert bool((den == 0).any())  # the case occurs in this input
  np.testing.assert_allclose(out, want * mask[:, :, None, None], atol=1e-5)


def test_cosformer_padding_and_horizon():
  """More padding leaves real outputs unchanged by default; max_len < length is refused."""
  q, k, v = qkv(length=20)
  mask = jnp.arange(20)[None, :] < jnp.array([[12], [12]])
  out = cosformer.cosformer_attention(q, k, v, mask=mask)
  short = cosformer.cosformer_attention(q[:, :12], k[:, :12], v[:, :12])
  np.testing.assert_allclose(out[:, :12], short, atol=1e-6)
  with pytest.raises(ValueError, match="length 20 exceeds max_len=16"):
    cosformer.cosformer_attention(q, k, v, max_len=16)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_performer_equals_its_closed_form(kernel, causal):
  """The linear-time computation is exact for the features it draws."""
  q, k, v = qkv()
  mask = padding_mask()
  proj = performer.draw_features(jax.random.PRNGKey(0), 32, q.shape[-1])
  out = performer.performer_attention(q, k, v, projection=proj, mask=mask, causal=causal,
                                      kernel=kernel, chunk_size=8)
  phi_q = performer.favor_features(q, proj, kernel=kernel, is_query=True)
  phi_k = performer.favor_features(k, proj, kernel=kernel, is_query=False, mask=mask)
  np.testing.assert_allclose(out, _closed_form(phi_q, phi_k, v, mask, causal), atol=1e-5)


def test_orthogonal_features_are_unbiased():
  """E[exp(w.z)] = exp(|z|^2 / 2) for Gaussian-marginal rows; a sign-biased QR breaks it."""
  w = performer.draw_features(jax.random.PRNGKey(3), 65536, 8, orthogonal=True)
  z = jnp.full(8, 0.3)
  assert abs(float(jnp.mean(jnp.exp(w @ z))) / float(jnp.exp(z @ z / 2)) - 1) < 0.01
  block = w[:8] / jnp.linalg.norm(w[:8], axis=1, keepdims=True)
  np.testing.assert_allclose(block @ block.T, np.eye(8), atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_performer_error_shrinks_with_features(causal):
  """Relative error vs softmax attention, mean over 3 draws: 16 -> 64 -> 256 -> 1024
  features, each smaller, and 1024 features at least 3x better than 16."""
  q, k, v = qkv(length=64)
  q, k = 0.5 * q, 0.5 * k
  mask = padding_mask(2, 64)
  exact = ea.reference(q, k, v, mask=mask, causal=causal)
  run = jax.jit(lambda p: performer.performer_attention(q, k, v, projection=p, mask=mask,
                                                        causal=causal, chunk_size=16))
  errors = []
  for m in (16, 64, 256, 1024):
    draws = [performer.draw_features(jax.random.PRNGKey(s), m, q.shape[-1]) for s in range(3)]
    errors.append(np.mean([_rel(run(p), exact) for p in draws]))
  assert all(a > b for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < errors[0] / 3, errors


def test_nystrom_is_exact_with_a_landmark_per_token():
  """Up to the pseudo-inverse's tolerance: the float32 iteration bottoms out near 1e-5
  to 1e-4 after ~16 iterations and drifts slowly afterwards."""
  q, k, v = qkv(length=32)
  mask = padding_mask(2, 32)
  out = ea.nystrom_attention(q, k, v, mask=mask, num_landmarks=32, pinv_iters=16)
  np.testing.assert_allclose(out, ea.reference(q, k, v, mask=mask), atol=1e-4)


def test_nystrom_error_shrinks_with_landmarks():
  q, k, v = qkv(length=64)
  q, k = 0.5 * q, 0.5 * k
  exact = ea.reference(q, k, v)
  errors = [_rel(ea.nystrom_attention(q, k, v, num_landmarks=m), exact) for m in (4, 16, 64)]
  assert errors[0] > errors[1] > errors[2], errors
  assert errors[-1] < 0.05, errors


@pytest.mark.parametrize("share", ["none", "headwise", "kv"])
def test_linformer_with_identity_projections_is_exact(share):
  """E = F = I with k = length: attention over the keys and values, padding zeroed."""
  q, k, v = qkv(length=24)
  mask = padding_mask(2, 24)
  module = ea.make("linformer", k=24, max_len=24, share=share)
  params = nn.unbox(module.init(jax.random.PRNGKey(0), q, k, v)["params"])
  eye = jnp.broadcast_to(jnp.eye(24), params["E"].shape)
  params = jax.tree.map(lambda _: eye, params)
  out = module.apply({"params": params}, q, k, v)
  np.testing.assert_allclose(out, ea.reference(q, k, v), atol=1e-5)
  keep = mask[:, :, None, None]
  out = module.apply({"params": params}, q, k, v, mask=mask)
  want = ea.reference(q, k * keep, v * keep) * keep
  np.testing.assert_allclose(out, want, atol=1e-5)


@pytest.mark.parametrize("mode", ["dense", "random", "factorized_random"])
@pytest.mark.parametrize("causal", [False, True])
def test_synthesizer_equals_its_formula(mode, causal):
  q, k, v = qkv(length=20)
  mask = padding_mask(2, 20)
  module = ea.make("synthesizer", mode=mode, max_len=32, causal=causal)
  params = nn.unbox(module.init(jax.random.PRNGKey(0), q, k, v)["params"])
  out = module.apply({"params": params}, q, k, v, mask=mask)
  n = 20
  if mode == "random":
    logits = params["R"][None, :, :n, :n]
  elif mode == "factorized_random":
    logits = jnp.einsum("hqr,hkr->hqk", params["R1"][:, :n], params["R2"][:, :n])[None] / 8 ** 0.5
  else:
    hidden = jax.nn.relu(jnp.einsum("blhd,hde->bhle", q, params["W1"]) + params["b1"][:, None])
    logits = jnp.einsum("bhle,hem->bhlm", hidden, params["W2"][..., :n]) + params["b2"][:, None, :n]
  allowed = mask[:, None, None, :] & (jnp.tri(n, dtype=bool) if causal else True)
  weights = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
  want = jnp.einsum("bhqk,bkhd->bqhd", weights, v) * mask[:, :, None, None]
  np.testing.assert_allclose(out, want, atol=1e-5)


def test_sinkhorn_balancing_is_doubly_stochastic():
  logits = jax.random.normal(jax.random.PRNGKey(0), (3, 6, 6)) * 2
  p = jnp.exp(sinkhorn.log_sinkhorn(logits, jnp.ones((6, 6), bool), iters=50))
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-4)
  np.testing.assert_allclose(p.sum(-2), 1.0, atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_sinkhorn_equals_a_direct_implementation(causal):
  """Block by block in NumPy, from the paper's description and the module's parameters."""
  bs, n_blocks, heads, d = 4, 5, 2, 8
  q, k, v = (np.asarray(x) for x in qkv(batch=1, length=bs * n_blocks, heads=heads, dim=d))
  module = ea.make("sinkhorn", block_size=bs, max_len=64, sinkhorn_iters=3, causal=causal)
  params = nn.unbox(module.init(jax.random.PRNGKey(0), q, k, v)["params"])
  out = np.asarray(module.apply({"params": params}, q, k, v))
  w1, b1 = (np.asarray(params["sort_hidden"][n]) for n in ("kernel", "bias"))
  w2, b2 = (np.asarray(params["sort_out"][n]) for n in ("kernel", "bias"))
  kb = k[0].reshape(n_blocks, bs, heads, d)
  vb = v[0].reshape(n_blocks, bs, heads, d)
  want = np.zeros_like(q[0]).reshape(n_blocks, bs, heads, d)
  for h in range(heads):
    if causal:
      summary = np.stack([kb[:i, :, h].reshape(-1, d).mean(0) if i else np.zeros(d)
                          for i in range(n_blocks)])
    else:
      summary = kb[:, :, h].mean(1)
    r = (np.maximum(summary @ w1 + b1, 0) @ w2 + b2)[:, :n_blocks] / 0.75
    allowed = np.tril(np.ones((n_blocks, n_blocks), bool), -1) if causal else np.ones(
        (n_blocks, n_blocks), bool)
    logp = np.where(allowed, r, -np.inf)
    for _ in range(1 if causal else 3):
      logp = logp - np.log(np.exp(logp).sum(1, keepdims=True) + 1e-300)
      if not causal:
        logp = logp - np.log(np.exp(logp).sum(0, keepdims=True))
    p = np.where(allowed, np.exp(logp), 0.0)
    for i in range(n_blocks):
      keys = np.concatenate([kb[i, :, h], np.einsum("j,jtd->td", p[i], kb[:, :, h])])
      vals = np.concatenate([vb[i, :, h], np.einsum("j,jtd->td", p[i], vb[:, :, h])])
      ok = np.ones((bs, 2 * bs), bool)
      if causal:
        ok[:, :bs] = np.tril(np.ones((bs, bs), bool))
        ok[:, bs:] = i > 0
      s = np.where(ok, q[0].reshape(n_blocks, bs, heads, d)[i, :, h] @ keys.T / d ** 0.5, -np.inf)
      a = np.exp(s - s.max(1, keepdims=True))
      want[i, :, h] = (a / a.sum(1, keepdims=True)) @ vals
  np.testing.assert_allclose(out[0], want.reshape(out[0].shape), atol=1e-5)

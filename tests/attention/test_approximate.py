"""Approximate families: error against softmax attention shrinks with their budget, and
each equals its own closed form."""

import functools

import chex
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


def _favor_closed_form(q, k, v, mask, projection, causal, kernel="softmax"):
  """FAVOR+ from the paper's formulas, in float64 NumPy, as an explicit quadratic sum:
  ``phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m)`` (softmax) or ``relu(W x') / sqrt(m) +
  1e-3`` (ReLU) with ``x' = x / d^(1/4)``; ``out_i = sum_j A_ij v_j / sum_j A_ij`` over the
  real (and, if causal, earlier) keys, ``A_ij = phi(q_i) . phi(k_j)``."""
  q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, projection))
  mask = np.asarray(mask)
  m, d = w.shape

  def phi(x):
    x = x / d ** 0.25
    proj = np.einsum("blhd,md->blhm", x, w)
    if kernel == "relu":
      return np.maximum(proj, 0) / np.sqrt(m) + 1e-3
    return np.exp(proj - 0.5 * np.sum(x * x, axis=-1, keepdims=True)) / np.sqrt(m)

  scores = np.einsum("bqhm,bkhm->bhqk", phi(q), phi(k))
  length = q.shape[1]
  allowed = mask[:, None, None, :] & (np.tri(length, dtype=bool) if causal else True)
  scores = np.where(allowed, scores, 0.0)
  out = np.einsum("bhqk,bkhd->bqhd", scores, v) / np.swapaxes(scores.sum(-1), 1, 2)[..., None]
  return out * mask[:, :, None, None]


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_performer_equals_the_papers_formula(kernel, causal):
  """The linear-time computation is exactly FAVOR+ for the features it draws; with
  google-research's ``epsilon=1e-6`` within 1e-3 of it."""
  q, k, v = qkv()
  mask = padding_mask()
  proj = performer.draw_features(jax.random.PRNGKey(0), 32, q.shape[-1])
  want = _favor_closed_form(q, k, v, mask, proj, causal, kernel)
  for epsilon, atol in ((0.0, 1e-5), (1e-6, 1e-3)):
    out = performer.performer_attention(q, k, v, projection=proj, mask=mask, causal=causal,
                                        kernel=kernel, chunk_size=8, epsilon=epsilon)
    np.testing.assert_allclose(out, want, atol=atol, err_msg=f"epsilon={epsilon}")


@pytest.mark.parametrize("causal", [False, True])
def test_performer_at_large_scales(causal):
  """Head dim 64, entries of q and k with std 3 and 10 (logits of std ~70 and ~800):
  finite outputs and gradients and no zeroed row (std 20 too); with epsilon=0, at std 3
  still the paper's estimator (float64 closed form) to 1e-4; causal outputs depend on no
  later token (a prefix run gives the same outputs). An earlier version shifted every key by the maximum over the
  whole sequence: NaN gradients from std 3, causality broken from std 5, all-zero early
  outputs at std 20."""
  keys = jax.random.split(jax.random.PRNGKey(4), 3)
  q, k, v = (jax.random.normal(key, (1, 96, 2, 64)) for key in keys)
  proj = performer.draw_features(jax.random.PRNGKey(0), 256, 64)
  def run(q, k, v, epsilon=1e-6):
    return performer.performer_attention(q, k, v, projection=proj, causal=causal,
                                         chunk_size=32, epsilon=epsilon)

  @jax.jit
  def out_and_grads(q, k, v):
    out, vjp = jax.vjp(run, q, k, v)
    return out, vjp(2.0 * out)  # gradients of sum(out ** 2)

  for std in (3.0, 10.0, 20.0):
    out, grads = out_and_grads(std * q, std * k, v)
    chex.assert_tree_all_finite(out)
    chex.assert_tree_all_finite(grads)
    assert bool(jnp.all(jnp.abs(out).max(axis=-1) > 0))  # no query row is wiped out
    if std == 3.0:  # the exact estimator (epsilon=0) at this scale
      exact = jax.jit(functools.partial(run, epsilon=0.0))(std * q, std * k, v)
      want = _favor_closed_form(std * q, std * k, v, jnp.ones((1, 96), bool), proj, causal)
      np.testing.assert_allclose(exact, want, atol=1e-4 * np.abs(want).max())
    if causal:
      for t in (8, 40):
        prefix = jax.jit(run)(std * q[:, :t], std * k[:, :t], v[:, :t])
        np.testing.assert_allclose(out[:, :t], prefix, atol=1e-5 * np.abs(prefix).max(),
                                   err_msg=f"std={std}: prefix of {t}")


def test_orthogonal_features_are_unbiased():
  """E[exp(w.z)] = exp(|z|^2 / 2) for Gaussian-marginal rows; a sign-biased QR breaks it."""
  w = performer.draw_features(jax.random.PRNGKey(3), 65536, 8, orthogonal=True)
  z = jnp.full(8, 0.3)
  assert abs(float(jnp.mean(jnp.exp(w @ z))) / float(jnp.exp(z @ z / 2)) - 1) < 0.01
  block = w[:8] / jnp.linalg.norm(w[:8], axis=1, keepdims=True)
  np.testing.assert_allclose(block @ block.T, np.eye(8), atol=1e-5)
  iid = performer.draw_features(jax.random.PRNGKey(3), 65536, 8, orthogonal=False)
  assert abs(float(jnp.mean(jnp.exp(iid @ z))) / float(jnp.exp(z @ z / 2)) - 1) < 0.01
  assert abs(float(jnp.std(iid)) - 1) < 0.01
  block = iid[:8] / jnp.linalg.norm(iid[:8], axis=1, keepdims=True)
  assert float(jnp.abs(block @ block.T - jnp.eye(8)).max()) > 0.05  # not orthogonal


@pytest.mark.slow  # 12 feature draws up to 1024 features
@pytest.mark.parametrize("orthogonal", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_performer_error_shrinks_with_features(causal, orthogonal):
  """Relative error vs softmax attention, mean over 3 draws: 16 -> 64 -> 256 -> 1024
  features, each smaller, and 1024 features at least 3x better than 16 (orthogonal or
  i.i.d. Gaussian features)."""
  q, k, v = qkv(length=64)
  q, k = 0.5 * q, 0.5 * k
  mask = padding_mask(2, 64)

  @jax.jit
  def mean_errors():
    """All draws and feature counts in one program (the draws vmapped)."""
    exact = ea.reference(q, k, v, mask=mask, causal=causal)

    def error(key, m):
      p = performer.draw_features(key, m, q.shape[-1], orthogonal)
      out = performer.performer_attention(q, k, v, projection=p, mask=mask, causal=causal,
                                          chunk_size=16)
      return jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact)

    keys = jnp.stack([jax.random.PRNGKey(s) for s in range(3)])
    return [jnp.mean(jax.vmap(lambda key: error(key, m))(keys))  # noqa: B023
            for m in (16, 64, 256, 1024)]

  errors = [float(e) for e in mean_errors()]
  assert all(a > b for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < errors[0] / 3, errors


def test_nystrom_is_exact_with_a_landmark_per_token():
  """Up to the pseudo-inverse's tolerance: the float32 iteration bottoms out near 1e-5
  to 1e-4 after ~16 iterations and drifts slowly afterwards."""
  q, k, v = qkv(length=32)
  mask = padding_mask(2, 32)
  out, want = jax.jit(lambda q, k, v: (
      ea.nystrom_attention(q, k, v, mask=mask, num_landmarks=32, pinv_iters=16),
      ea.reference(q, k, v, mask=mask)))(q, k, v)
  np.testing.assert_allclose(out, want, atol=1e-4)


def test_nystrom_error_shrinks_with_landmarks():
  q, k, v = qkv(length=64)
  q, k = 0.5 * q, 0.5 * k
  outs, exact = jax.jit(lambda q, k, v: (
      [ea.nystrom_attention(q, k, v, num_landmarks=m) for m in (4, 16, 64)],
      ea.reference(q, k, v)))(q, k, v)
  errors = [_rel(out, exact) for out in outs]
  assert errors[0] > errors[1] > errors[2], errors
  assert errors[-1] < 0.05, errors


def _hf_nystrom(q, k, v, num_landmarks, iters, conv=None):
  """Hugging Face's NystromformerSelfAttention semantics (``init_option="exact"``), in
  float64 NumPy, for a length that is a multiple of ``num_landmarks`` and no padding:
  contiguous equal segments, ``softmax(Q K~) pinv(softmax(Q~ K~)) softmax(Q~ K) V`` with
  ``Z0 = A^T / max column sum``, plus the depthwise convolution of V (kernel
  ``conv [size, heads]``, zero padding) when given."""
  q, k, v = (np.swapaxes(np.asarray(x, np.float64), 1, 2) for x in (q, k, v))  # [b, h, l, d]
  b, h, length, d = q.shape
  q, k = q / d ** 0.25, k / d ** 0.25

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  seg = length // num_landmarks
  q_land = q.reshape(b, h, num_landmarks, seg, d).mean(-2)
  k_land = k.reshape(b, h, num_landmarks, seg, d).mean(-2)
  kernel_1 = softmax(q @ np.swapaxes(k_land, -1, -2))
  kernel_2 = softmax(q_land @ np.swapaxes(k_land, -1, -2))
  kernel_3 = softmax(q_land @ np.swapaxes(k, -1, -2))
  eye = np.eye(num_landmarks)
  z = np.swapaxes(kernel_2, -1, -2) / kernel_2.sum(-2).max(-1)[..., None, None]
  for _ in range(iters):
    kz = kernel_2 @ z
    z = 0.25 * z @ (13 * eye - kz @ (15 * eye - kz @ (7 * eye - kz)))
  out = kernel_1 @ z @ (kernel_3 @ v)
  if conv is not None:
    size = conv.shape[0]
    padded = np.pad(v, ((0, 0), (0, 0), (size // 2, size // 2), (0, 0)))
    out = out + sum(np.asarray(conv, np.float64)[t][None, :, None, None]
                    * padded[:, :, t:t + length] for t in range(size))
  return np.swapaxes(out, 1, 2)


@pytest.mark.parametrize("conv_kernel_size", [None, 5])
def test_nystrom_equals_hugging_face_semantics(conv_kernel_size):
  q, k, v = qkv(length=48)
  module = ea.make("nystrom", num_landmarks=8, conv_kernel_size=conv_kernel_size)
  variables = module.init(jax.random.PRNGKey(0), q, k, v)
  out = module.apply(variables, q, k, v)
  conv = None if conv_kernel_size is None else nn.unbox(variables["params"]["conv_kernel"])
  np.testing.assert_allclose(out, _hf_nystrom(q, k, v, 8, 6, conv), atol=1e-5)


def _nystrom_segments(mask, num_landmarks):
  """Landmark of each real token: its rank r among the n real tokens -> floor(r m' / n)
  with m' = min(m, n); -1 for padding."""
  out = np.full(mask.shape, -1)
  for b, row in enumerate(np.asarray(mask)):
    real = np.flatnonzero(row)
    n, m = len(real), min(num_landmarks, len(real))
    out[b, real] = np.arange(n) * m // max(n, 1)
  return out


@pytest.mark.parametrize("length", [64, 65, 100, 129])
def test_nystrom_uses_every_landmark(length):
  """Exactly 64 non-empty contiguous segments of near-equal size for any length >= 64
  (an earlier version padded to whole segments: 33 landmarks at 65, 43 at 129)."""
  from effx.attention.nystrom import segments  # noqa: PLC0415
  member = np.asarray(segments(jnp.ones((1, length), bool), 64))[0]
  assert np.all(member.sum(axis=1) == 1)
  sizes = member.sum(axis=0)
  assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1
  assert np.all(np.diff(member.argmax(axis=1)) >= 0)


def test_nystrom_on_ragged_padded_inputs():
  """Padding anywhere: landmarks are the means of real tokens only (NumPy, float64)."""
  q, k, v = qkv(length=30)
  mask = np.arange(30)[None, :] < np.array([[30], [19]])
  mask[0, 4:7] = False
  out = ea.nystrom_attention(q, k, v, mask=jnp.asarray(mask), num_landmarks=8, pinv_iters=8)
  seg = _nystrom_segments(mask, 8)
  q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
  d = q.shape[-1]
  for b in range(2):
    real = np.flatnonzero(mask[b])
    for h in range(q.shape[2]):
      qs, ks, vs = q64[b, real, h] / d ** 0.25, k64[b, real, h] / d ** 0.25, v64[b, real, h]
      q_land = np.stack([qs[seg[b, real] == i].mean(0) for i in range(8)])
      k_land = np.stack([ks[seg[b, real] == i].mean(0) for i in range(8)])
      soft = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(  # noqa: E731
          x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)
      a = soft(q_land @ k_land.T)
      z = a.T / a.sum(0).max()
      for _ in range(8):
        az = a @ z
        z = 0.25 * z @ (13 * np.eye(8) - az @ (15 * np.eye(8) - az @ (7 * np.eye(8) - az)))
      want = soft(qs @ k_land.T) @ z @ (soft(q_land @ ks.T) @ vs)
      np.testing.assert_allclose(np.asarray(out)[b, real, h], want, atol=1e-5)
  assert np.all(np.asarray(out)[~mask] == 0)


def test_nystrom_conv_kernel_size_must_be_odd():
  with pytest.raises(ValueError, match="conv_kernel_size=4 must be odd"):
    ea.make("nystrom", conv_kernel_size=4)


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
  """Block by block in NumPy, from the paper's description and the module's parameters,
  on a ragged length (22 = 5.5 blocks of 4) with padding at the end and in the middle.
  Padding rules (module docstring): padded keys and values are zeroed; summaries are
  means of real keys; only blocks up to the last real token are sorted; a sorted slot
  that no real key feeds is masked; padded queries output zero."""
  bs, heads, d, length = 4, 2, 8, 22
  q32, k32, v32 = qkv(batch=2, length=length, heads=heads, dim=d)
  q, k, v = (np.asarray(x, np.float64) for x in (q32, k32, v32))
  mask = np.arange(length)[None, :] < np.array([[length], [13]])
  mask[1, 5:7] = False
  module = ea.make("sinkhorn", block_size=bs, max_len=64, sinkhorn_iters=3, causal=causal)
  params = nn.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), q32, k32, v32)["params"])
  out = np.asarray(jax.jit(module.apply)({"params": params}, q32, k32, v32,
                                         mask=jnp.asarray(mask)))
  w1, b1 = (np.asarray(params["sort_hidden"][n], np.float64) for n in ("kernel", "bias"))
  w2, b2 = (np.asarray(params["sort_out"][n], np.float64) for n in ("kernel", "bias"))
  n = -(-length // bs)
  pad = n * bs - length
  for b in range(2):
    real = np.pad(mask[b], (0, pad))
    nr = -(-(np.flatnonzero(real)[-1] + 1) // bs)
    blocks = lambda x: np.pad(x[b], ((0, pad), (0, 0), (0, 0))).reshape(n, bs, heads, d)  # noqa: E731
    qb, kb, vb = blocks(q), blocks(k) * real.reshape(n, bs, 1, 1), blocks(v) * real.reshape(
        n, bs, 1, 1)
    rb = real.reshape(n, bs)
    want = np.zeros((n, bs, heads, d))
    for h in range(heads):
      sums, counts = kb[:, :, h].sum(1), rb.sum(1)
      if causal:
        sums, counts = np.cumsum(sums, 0) - sums, np.cumsum(counts) - counts
      summary = sums / np.maximum(counts, 1)[:, None]
      r = (np.maximum(summary @ w1 + b1, 0) @ w2 + b2)[:, :n] / 0.75
      allowed = np.zeros((n, n), bool)
      allowed[:nr, :nr] = True
      if causal:
        allowed &= np.tri(n, k=-1, dtype=bool)
      logp = np.where(allowed, r, -np.inf)
      for _ in range(1 if causal else 3):
        logp = logp - np.log(np.exp(logp).sum(1, keepdims=True) + 1e-300)
        if not causal:
          logp = logp - np.log(np.exp(logp).sum(0, keepdims=True) + 1e-300)
      p = np.where(allowed, np.exp(logp), 0.0)
      for i in range(n):
        keys = np.concatenate([kb[i, :, h], np.einsum("j,jtd->td", p[i], kb[:, :, h])])
        vals = np.concatenate([vb[i, :, h], np.einsum("j,jtd->td", p[i], vb[:, :, h])])
        ok = np.concatenate([np.broadcast_to(rb[i], (bs, bs)),
                             np.broadcast_to(p[i] @ rb > 0, (bs, bs))], axis=1)
        if causal:
          ok[:, :bs] &= np.tri(bs, dtype=bool)
        s = np.where(ok, qb[i, :, h] @ keys.T / d ** 0.5, -np.inf)
        seen = ok.any(1)  # padded query blocks past the last real token see nothing
        a = np.exp(s[seen] - s[seen].max(1, keepdims=True))
        want[i, seen, h] = (a / a.sum(1, keepdims=True)) @ vals
    want = want.reshape(n * bs, heads, d)[:length] * mask[b][:, None, None]
    np.testing.assert_allclose(out[b], want, atol=1e-5, err_msg=f"row {b}")


def test_sinkhorn_gumbel_noise():
  """With ``gumbel_noise``, training calls sort with noise from the "dropout" stream (a
  different key changes the output, the same key repeats it); evaluation has none."""
  q, k, v = qkv(length=32)
  module = ea.make("sinkhorn", block_size=4, max_len=64, gumbel_noise=True)
  variables = module.init(jax.random.PRNGKey(0), q, k, v)
  plain = ea.make("sinkhorn", block_size=4, max_len=64)

  def train(key):
    return module.apply(variables, q, k, v, deterministic=False, rngs={"dropout": key})

  a, b = train(jax.random.PRNGKey(1)), train(jax.random.PRNGKey(2))
  assert float(jnp.abs(a - b).max()) > 1e-3
  np.testing.assert_array_equal(train(jax.random.PRNGKey(1)), a)
  np.testing.assert_array_equal(module.apply(variables, q, k, v),
                                plain.apply(variables, q, k, v))

"""Helpers shared by the tests: small family options, random inputs, bound families."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import effx.attention as ea

# Options that make every family non-trivial at test lengths (~40 tokens).
SMALL = {
    "blockwise": dict(q_chunk=8, k_chunk=16),
    "local": dict(window=4),
    "dilated": dict(window=2, dilation=(1, 2, 3)),
    "sparse": dict(stride=6),
    "longformer": dict(window=3, global_tokens=(0, 9, -1)),
    "bigbird": dict(block_size=4, num_random_blocks=2, num_global_blocks=2),
    "lsh": dict(n_hashes=2, bucket_size=8),
    "routing": dict(num_clusters=4, window=12),
    "sinkhorn": dict(block_size=8, max_len=64),
    "linformer": dict(k=16, max_len=64),
    "synthesizer": dict(max_len=64),
    "nystrom": dict(num_landmarks=8),
    "performer": dict(num_features=64),
    "linear": dict(chunk_size=8),
    "cosformer": dict(chunk_size=8),
    "adaptive_span": dict(max_span=12, ramp=4, init_span=0.5),
}
HEADS = 3


def model_options(name):
  """``SMALL``'s options of ``name`` for a whole model: lengths room for 64 tokens, one
  dilation for every head (a model's head count need not match the test option's)."""
  options = dict(SMALL.get(name, {}))
  if "max_len" in options:
    options["max_len"] = 64
  if name == "dilated":
    options["dilation"] = 2
  return options


def cases():
  """(name, causal) for every family and every causal setting it supports."""
  return [(n, c) for n in ea.names() for c in (False, True) if not c or ea.supports_causal(n)]


def qkv(seed=0, batch=2, length=37, heads=HEADS, dim=8, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return tuple(jax.random.normal(k, (batch, length, heads, dim), dtype) for k in keys)


def padding_mask(batch=2, length=37):
  """First row full, later rows padded at the end to decreasing lengths."""
  lengths = np.array([length] + [max(1, length // (i + 2)) for i in range(batch - 1)])
  return jnp.asarray(np.arange(length)[None, :] < lengths[:, None])


def Bound(name, causal=False, q=None, mask=None, **override):  # noqa: N802 (reads as a class)
  """The family ``name`` with initialised variables, shared by every test that asks for
  the same family, options and input shape, so compiled executables are reused."""
  q = qkv()[0] if q is None else q
  return _bound(name, causal, q.shape, mask is not None, tuple(sorted(override.items())))


@functools.lru_cache(maxsize=None)
def _bound(name, causal, shape, masked, override):
  return _Bound(name, causal, jnp.zeros(shape), padding_mask(*shape[:2]) if masked else None,
                **dict(override))


class _Bound:
  """A family module with initialised variables, callable like a pure function.

  ``init`` and ``apply`` are jitted: one compilation per shape instead of one per
  primitive.
  """

  def __init__(self, name, causal, q, mask, **override):
    self.module = ea.make(name, causal=causal, **{**SMALL.get(name, {}), **override})
    q = q + jax.random.normal(jax.random.PRNGKey(3), q.shape)
    self.variables = jax.jit(self.module.init)(jax.random.PRNGKey(42), q, q, q, mask=mask)
    self._apply = jax.jit(self.module.apply, static_argnames=("deterministic",))

    def loss(variables, q, k, v, mask):
      return jnp.sum(jnp.square(self.module.apply(variables, q, k, v, mask=mask)))

    self._grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3)))

  def grad(self, q, k, v, mask=None):
    """Gradients of ``sum(out ** 2)`` with respect to q, k, v (compiled once)."""
    return self._grad(self.variables, q, k, v, mask)

  def __call__(self, q, k, v, mask=None, deterministic=True, rng=None):
    rngs = None if rng is None else {"dropout": rng}
    return self._apply(self.variables, q, k, v, mask=mask, deterministic=deterministic,
                       rngs=rngs)


def set_keys(config, overrides):
  """Sets dotted keys (``"model.attention"``) of a ConfigDict in place; returns it."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config

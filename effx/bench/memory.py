"""Compiled memory of attention families, from XLA's ``memory_analysis()``.

Compilation only: nothing runs, so even lengths whose dense attention would not fit in
RAM can be measured, and the numbers are deterministic for a given jax/jaxlib version
and backend.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import flags

import effx.attention as ea
from effx import cli
from effx.bench import harness
from effx.layers.config import BlockConfig
from effx.layers.feed_forward import FeedForward
from effx.layers.stack import Stack

FLAGS = flags.FLAGS

# Options at which each family is sub-quadratic at long lengths: the defaults, except
# routing's window (its default grows with the length) and max_len of the families with
# length-shaped parameters (the longest length measured by the tests and benchmarks).
LONG_OPTIONS: dict[str, dict[str, Any]] = {
    "blockwise": dict(q_chunk=512, k_chunk=512),
    "local": dict(window=128),
    "dilated": dict(window=64, dilation=2),
    "sparse": dict(stride=128),
    "longformer": dict(window=128),
    "bigbird": dict(block_size=64),
    "lsh": dict(bucket_size=64, n_hashes=2),
    "routing": dict(num_clusters=8, window=256),
    "sinkhorn": dict(block_size=64, max_len=8192),
    "linformer": dict(k=256, max_len=8192),
    "synthesizer": dict(mode="factorized_random", max_len=8192),
    "nystrom": dict(num_landmarks=64),
    "performer": dict(num_features=256),
    "linear": dict(),
    "cosformer": dict(),
    "hierarchical": dict(block_size=16),
    "adaptive_span": dict(max_span=256),
}


def attention_memory(name: str, length: int, *, batch: int = 1, heads: int = 4,
                     head_dim: int = 32, causal: bool = False, train: bool = True,
                     dtype=jnp.float32, **options) -> dict[str, int]:
  """Compiled byte counts of one attention call (``train``: forward + backward w.r.t.
  q, k, v and the family's parameters).

  Returns:
    ``{"temp": ..., "argument": ..., "output": ...}`` bytes from ``memory_analysis()``.
  """
  module = ea.make(name, causal=causal, **options)
  shape = jax.ShapeDtypeStruct((batch, length, heads, head_dim), dtype)
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), shape, shape, shape)
  variables = nn.unbox(variables)

  def loss(variables, q, k, v):
    # A squared loss: a plain sum's constant cotangent lets XLA constant-fold parts of the
    # backward pass, which a real loss never allows.
    return jnp.sum(jnp.square(module.apply(variables, q, k, v).astype(jnp.float32)))

  fn = jax.grad(loss, argnums=(0, 1, 2, 3)) if train else loss
  compiled = jax.jit(fn).lower(variables, shape, shape, shape).compile()
  stats = compiled.memory_analysis()
  return {"temp": int(stats.temp_size_in_bytes), "argument": int(stats.argument_size_in_bytes),
          "output": int(stats.output_size_in_bytes)}


def memory_table(lengths=(4096, 8192), causal: bool = False, **shape) -> list[dict[str, Any]]:
  """Forward+backward compiled temporary memory of every family at ``lengths``."""
  rows = []
  for name in ea.names():
    if causal and not ea.supports_causal(name):
      continue
    row: dict[str, Any] = {"family": name}
    for length in lengths:
      row[length] = attention_memory(name, length, causal=causal, **shape,
                                     **LONG_OPTIONS.get(name, {}))["temp"]
    rows.append(row)
  return rows


def stack_memory(num_layers: int, length: int, *, reversible: bool = False,
                 remat: str = "none", attention: str = "dense", emb_dim: int = 128,
                 num_heads: int = 4, mlp_dim: int = 256, batch: int = 1,
                 ff_chunk_size: int | None = None, **attention_kwargs) -> dict[str, int]:
  """Compiled byte counts of forward + backward (w.r.t. parameters and inputs) through a
  ``Stack`` of ``num_layers`` blocks on ``[batch, length, emb_dim]`` inputs."""
  cfg = BlockConfig(emb_dim=emb_dim, num_heads=num_heads, qkv_dim=emb_dim, mlp_dim=mlp_dim,
                    attention=attention, attention_kwargs=tuple(attention_kwargs.items()),
                    ff_chunk_size=ff_chunk_size, remat=remat)
  model = Stack(cfg, num_layers=num_layers, reversible=reversible)
  x = jax.ShapeDtypeStruct((batch, length, emb_dim), jnp.float32)
  init = lambda rng, x: model.init(rng, x, None, True)  # noqa: E731 (keep the flag static)
  params = nn.unbox(jax.eval_shape(init, jax.random.PRNGKey(0), x))["params"]

  def loss(params, x):
    y, _ = model.apply({"params": params}, x, None, True)
    return jnp.sum(jnp.square(y))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  stats = compiled.memory_analysis()
  return {"temp": int(stats.temp_size_in_bytes), "argument": int(stats.argument_size_in_bytes),
          "output": int(stats.output_size_in_bytes)}


def feed_forward_memory(length: int, chunk_size: int | None, *, emb_dim: int = 128,
                        mlp_dim: int = 1024, batch: int = 1) -> int:
  """Compiled forward+backward temporary bytes of one ``FeedForward`` layer."""
  layer = FeedForward(mlp_dim=mlp_dim, chunk_size=chunk_size)
  x = jax.ShapeDtypeStruct((batch, length, emb_dim), jnp.float32)
  params = nn.unbox(jax.eval_shape(layer.init, jax.random.PRNGKey(0), x))["params"]

  def loss(params, x):
    return jnp.sum(jnp.square(layer.apply({"params": params}, x)))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def define_flags() -> None:
  flags.DEFINE_string("lengths", "4096,8192", "comma-separated lengths")
  flags.DEFINE_bool("causal", False, "causal attention")
  flags.DEFINE_bool("stack", False, "instead: layer stacks (plain / remat / reversible) at "
                    "2, 6, 12 layers and chunked feed-forward, at the last length")


def main() -> None:
  lengths = harness.parse_lengths(FLAGS.lengths)
  if FLAGS.stack:
    _print_stack_tables(lengths[-1])
    return
  rows = memory_table(lengths, causal=FLAGS.causal)
  dense = next(r for r in rows if r["family"] == "dense")
  print(f"{'family':12s}" + "".join(f"{n:>12d}" for n in lengths)
        + f"{'vs dense':>10s}{'growth':>8s}   (MiB, forward+backward temporaries)")
  for r in rows:
    mib = "".join(f"{r[n] / 2**20:12.1f}" for n in lengths)
    ratio = dense[lengths[-1]] / r[lengths[-1]]
    growth = r[lengths[-1]] / r[lengths[-2]] if len(lengths) > 1 else float("nan")
    print(f"{r['family']:12s}{mib}{ratio:9.1f}x{growth:7.2f}x")


def _print_stack_tables(length: int) -> None:
  variants = {"plain": {}, "remat full": dict(remat="full"), "remat dots": dict(remat="dots"),
              "remat attention": dict(remat="attention"), "reversible": dict(reversible=True)}
  print(f"stack forward+backward temporaries (MiB), length {length}, width 128, dense")
  print(f"{'variant':16s}" + "".join(f"{n:>10d}L" for n in (2, 6, 12)))
  for label, kwargs in variants.items():
    mib = [stack_memory(n, length, **kwargs)["temp"] / 2**20 for n in (2, 6, 12)]
    print(f"{label:16s}" + "".join(f"{m:11.0f}" for m in mib))
  print(f"feed-forward (mlp 1024) forward+backward temporaries (MiB), length {4 * length}")
  for chunk in (None, 4096, 1024, 256):
    print(f"  chunk {chunk!s:>5s}: {feed_forward_memory(4 * length, chunk) / 2**20:8.0f}")


if __name__ == "__main__":
  cli.run(define_flags, main)

"""Fidelity checks of the attention families: padding, causality, approximation, memory.

  python -m effx.bench.fidelity --out=experiments/results/cpu/fidelity

Writes four CSVs to ``--out`` (each with an ``error`` column instead of crashing) and
prints them:

* ``padding_length.csv``: every family (and its causal form), variables initialised once
  at length 64; the same 20 real tokens (13 in the second row) padded at the end with
  noise to lengths 20, 24, 40, 64. Max change of the real tokens' outputs against length
  20, absolute and relative to the largest output.
* ``performer_causal.csv``: causal performer with q, k of std ``s``: finite outputs and
  gradients, causality violation (full run against a run on the first ``t`` tokens).
* ``nystrom_error.csv``: nystrom's relative Frobenius error against dense attention.
* ``routing_memory.csv``: compiled forward+backward temporaries of default routing and
  dense attention, and their growth per doubling of the length.
"""

from __future__ import annotations

import concurrent.futures
import csv
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import effx.attention as ea
from effx import cli

FLAGS = flags.FLAGS

# tests/support.py SMALL, except routing (no window) and lsh (no n_buckets), so that
# their defaults are exercised, and longformer without its -1 global token (negative
# positions count from the end of the padded input, by definition).
SMALL: dict[str, dict[str, Any]] = {
    "blockwise": dict(q_chunk=8, k_chunk=16),
    "local": dict(window=4),
    "dilated": dict(window=2, dilation=(1, 2, 3)),
    "sparse": dict(stride=6),
    "longformer": dict(window=3, global_tokens=(0, 9)),
    "bigbird": dict(block_size=4, num_random_blocks=2, num_global_blocks=2),
    "lsh": dict(n_hashes=2, bucket_size=8),
    "routing": dict(num_clusters=4),
    "sinkhorn": dict(block_size=8, max_len=64),
    "linformer": dict(k=16, max_len=64),
    "synthesizer": dict(max_len=64),
    "nystrom": dict(num_landmarks=8),
    "performer": dict(num_features=64),
    "linear": dict(chunk_size=8),
    "cosformer": dict(chunk_size=8),
}
PAD_LENGTHS = (20, 24, 40, 64)
REAL = (20, 13)  # real tokens per row
STDS = (1, 2, 3, 5, 7, 10, 20)
PREFIXES = (8, 32, 100)
NYSTROM_LENGTHS = (64, 65, 100, 129, 256)
MEMORY_LENGTHS = (2048, 4096, 8192)


def _normal(seed: int, shape, n: int = 3):
  return tuple(jax.random.normal(k, shape) for k in jax.random.split(jax.random.PRNGKey(seed), n))


def _guarded(row: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
  """``row`` updated with ``fn()``, or with an ``error`` column if it raises."""
  try:
    row.update(fn())
  except Exception as e:  # noqa: BLE001 (a broken family is a result, not a crash)
    row["error"] = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
  return row


def padding_length() -> list[dict[str, Any]]:
  """Change of the real tokens' outputs when padding grows (module docstring)."""
  q, k, v = _normal(0, (2, max(PAD_LENGTHS), 3, 8))
  real = np.arange(max(PAD_LENGTHS))[None, :] < np.array(REAL)[:, None]  # [2, 64]
  cases = []
  for name in ea.names():
    for causal in (False, True) if ea.supports_causal(name) else (False,):

      def run(name=name, causal=causal):
        module = ea.make(name, causal=causal, **SMALL.get(name, {}))
        mask = jnp.asarray(real)
        variables = jax.jit(module.init)(jax.random.PRNGKey(0), q, k, v, mask=mask)
        apply = jax.jit(lambda q, k, v, mask: module.apply(variables, q, k, v, mask=mask))
        outs = {n: np.asarray(apply(q[:, :n], k[:, :n], v[:, :n], mask[:, :n]))
                for n in PAD_LENGTHS}
        base = outs[REAL[0]][real[:, :REAL[0]]]  # [real tokens, heads, dim]
        change = float(np.max([np.max(np.abs(outs[n][:, :REAL[0]][real[:, :REAL[0]]] - base))
                               for n in PAD_LENGTHS]))
        return {"max_abs_change": change, "max_rel_change": change / float(np.max(np.abs(base)))}

      cases.append(({"family": name, "causal": causal}, run))
  # Compilation dominates and is single-threaded: two cases at a time use both cores.
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    return list(pool.map(lambda case: _guarded(*case), cases))


def performer_causal() -> list[dict[str, Any]]:
  """Causal performer's finiteness and causality as q, k grow (module docstring)."""
  module = ea.make("performer", causal=True, num_features=256)
  q0, k0, v = _normal(1, (1, 128, 4, 64))
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), q0, k0, v)
  apply = jax.jit(lambda q, k, v: module.apply(variables, q, k, v))
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.square(apply(q, k, v))), argnums=(0, 1, 2)))
  rows = []
  for s in STDS:

    def run(s=s):
      q, k = q0 * s, k0 * s
      out = np.asarray(apply(q, k, v))
      grads_finite = all(bool(jnp.all(jnp.isfinite(g))) for g in grad(q, k, v))
      violation = float(np.max([np.max(np.abs(out[:, :t] - apply(q[:, :t], k[:, :t], v[:, :t])))
                                for t in PREFIXES]))
      return {"outputs_finite": bool(np.all(np.isfinite(out))), "grads_finite": grads_finite,
              "causality_violation": violation,
              "max_abs_out_first8": float(np.max(np.abs(out[:, :8])))}

    rows.append(_guarded({"std": s}, run))
  return rows


def nystrom_error(num_landmarks: int = 64, seeds: int = 3) -> list[dict[str, Any]]:
  """Nystrom's relative Frobenius error against ``ea.reference`` (module docstring)."""
  module = ea.make("nystrom", num_landmarks=num_landmarks)
  rows = []
  for n in NYSTROM_LENGTHS:

    @jax.jit
    def error(q, k, v):
      out = module.apply(module.init(jax.random.PRNGKey(0), q, k, v), q, k, v)
      ref = ea.reference(q, k, v)
      return jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)

    def run(n=n, error=error):
      errors = []
      for seed in range(seeds):
        q, k, v = _normal(seed, (2, n, 4, 32))
        errors.append(float(error(q * 0.5, k * 0.5, v)))
      return {"rel_error": float(np.mean(errors))}

    rows.append(_guarded({"length": n, "num_landmarks": num_landmarks}, run))
  return rows


def grad_temp_bytes(name: str, length: int, batch: int = 1, heads: int = 4,
                    head_dim: int = 32, **options) -> int:
  """Compiled temporaries of ``grad(sum(out ** 2))`` w.r.t. q, k, v, variables closed over."""
  module = ea.make(name, **options)
  x = jnp.zeros((batch, length, heads, head_dim), jnp.float32)
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), x, x, x)  # forward is dead code
  loss = lambda q, k, v: jnp.sum(jnp.square(module.apply(variables, q, k, v)))  # noqa: E731
  shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def routing_memory() -> list[dict[str, Any]]:
  """Default routing's and dense's compiled temporaries against length (module docstring)."""
  rows = []
  for name in ("routing", "dense"):
    previous = None
    for n in MEMORY_LENGTHS:
      row = _guarded({"family": name, "length": n},
                     lambda name=name, n=n: {"temp_mib": grad_temp_bytes(name, n) / 2**20})
      mib = row.get("temp_mib")
      row["growth_vs_previous_length"] = mib / previous if mib and previous else ""
      previous = mib
      rows.append(row)
  return rows


TABLES = {
    "padding_length": (padding_length, ("family", "causal", "max_abs_change", "max_rel_change")),
    "performer_causal": (performer_causal, ("std", "outputs_finite", "grads_finite",
                                            "causality_violation", "max_abs_out_first8")),
    "nystrom_error": (nystrom_error, ("length", "num_landmarks", "rel_error")),
    "routing_memory": (routing_memory, ("family", "length", "temp_mib",
                                        "growth_vs_previous_length")),
}


def _cell(x) -> str:
  return f"{x:.4g}" if isinstance(x, float) else str(x)


def define_flags() -> None:
  flags.DEFINE_string("out", None, "directory for the CSVs (required)")


def main() -> None:
  if not FLAGS.out:  # checked here: a required absl flag binds every command in the process
    raise ValueError("--out is required: the directory for the CSVs")
  os.makedirs(FLAGS.out, exist_ok=True)
  for table, (fn, columns) in TABLES.items():
    columns = (*columns, "error")
    rows = fn()
    with open(os.path.join(FLAGS.out, f"{table}.csv"), "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=columns, restval="")
      writer.writeheader()
      writer.writerows(rows)
    print(f"\n{table}.csv")
    cells = [columns] + [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns) - 1)]
    for r in cells:
      print("  ".join(c.rjust(w) for c, w in zip(r, widths)) + ("  " + r[-1] if r[-1] else ""))


if __name__ == "__main__":
  cli.run(define_flags, main)

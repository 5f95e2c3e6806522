"""Every family on every backend it has, against its XLA backend, on this machine's device.

  python experiments/backend_check.py --out=experiments/results/h100/backend_check

The tests check the Pallas and splash kernels in interpret mode on a CPU (lean shapes);
this runs them compiled for the device at hand (Triton on a GPU, Mosaic on a TPU; on a
CPU, interpret mode again) at a length their tiles like: outputs and the q, k, v
gradients of ``sum(out * cos(out))``, largest difference over the largest value, float32
and bfloat16, padded batch rows, encoder and causal. Writes ``results.csv`` and prints a
table.
"""

import argparse
import csv
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import effx.attention as ea


def relative(got, want) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


def check(name, backend, causal, dtype, length, batch=2, heads=4, dim=64):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k, v = (jax.random.normal(key, (batch, length, heads, dim), dtype) for key in keys)
  mask = jnp.arange(length)[None, :] < jnp.array([length, length // 3])[:, None]
  options = {"mode": "factorized_random", "max_len": length} if name == "synthesizer" else {}
  modules = [ea.make(name, causal=causal, implementation=i, **options) for i in ("xla", backend)]
  variables = jax.jit(modules[0].init)(jax.random.PRNGKey(0), q, k, v, mask=mask)

  def loss(module, q, k, v):
    out = module.apply(variables, q, k, v, mask=mask).astype(jnp.float32)
    return jnp.sum(out * jnp.cos(out)), out

  @jax.jit
  def both(q, k, v):
    return [jax.value_and_grad(functools.partial(loss, m), (0, 1, 2), has_aux=True)(q, k, v)
            for m in modules]

  ((_, want), want_grads), ((_, got), got_grads) = both(q, k, v)
  return relative(got, want), max(relative(g, w) for g, w in zip(got_grads, want_grads))


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None, help="folder for results.csv")
  parser.add_argument("--length", type=int, default=1024)
  args = parser.parse_args(argv)
  platform = jax.default_backend()
  rows = []
  for name in ea.names():
    for backend in ea.backends(name):
      if backend == "xla" or (backend == "cudnn" and platform != "gpu"):
        continue
      for dtype in (jnp.float32, jnp.bfloat16):
        for causal in (False, True):
          if backend == "cudnn" and (dtype == jnp.float32 or (name == "local" and not causal)):
            continue  # cuDNN: half precision; local: causal only
          row = dict(family=name, backend=backend, dtype=jnp.dtype(dtype).name, causal=causal,
                     length=args.length, device=jax.devices()[0].device_kind)
          try:
            row["out_rel"], row["grad_rel"] = check(name, backend, causal, dtype, args.length)
            row["status"] = "ok"
          except Exception as error:  # noqa: BLE001 (recorded, the next one runs)
            row["status"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
          rows.append(row)
          print(f"{name:12s} {backend:7s} {row['dtype']:9s} causal={causal!s:5s} "
                f"{row.get('out_rel', float('nan')):.1e} {row.get('grad_rel', float('nan')):.1e} "
                f"{row['status']}", flush=True)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.csv"), "w", newline="", encoding="utf-8") as f:
      writer = csv.DictWriter(f, fieldnames=["family", "backend", "dtype", "causal", "length",
                                             "device", "status", "out_rel", "grad_rel"])
      writer.writeheader()
      writer.writerows(rows)


if __name__ == "__main__":
  main(sys.argv[1:])

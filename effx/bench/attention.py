"""Speed and memory of every attention family against sequence length.

  python -m effx.bench.attention --families=all --lengths=512,1024,2048,4096,8192,16384 \\
      --mode=train --out=experiments/results/cpu/attention_train
  python -m effx.bench.attention --backends=xla,cudnn,pallas --dtype=bfloat16 ...  # a GPU
  python -m effx.bench.attention --backends=xla,splash --dtype=bfloat16 ...  # a TPU

For each family and length, in a fresh subprocess: the attention layer alone (already
projected ``q, k, v [batch, length, heads, head_dim]``), forward (``infer``) or forward +
backward w.r.t. q, k, v and the family's parameters (``train``); median / min / max time
over ``--repeat`` runs after a warm-up (compilation is never timed); XLA's compiled
temporary bytes (``memory_analysis()``); the process's peak memory (CPU: peak RSS,
including the ~0.3 GB of the Python/JAX runtime; GPU: peak device bytes). Achieved FLOP/s
is reported against a matmul ceiling measured in the same run, from analytic FLOP counts
(``flops()``). Writes ``results.csv``, ``time.png``, ``memory.png`` and ``README.md``
(command, device, versions, crossover lengths) to ``--out``. With several ``--backends``
each family runs on each one it has (``effx.attention.backends``), one line per (family,
backend), and dense on cuDNN (``jax.nn.dot_product_attention``) is the reference line
when asked for.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from absl import flags
from tqdm import tqdm

import effx.attention as ea
from effx import cli
from effx.attention import routing
from effx.bench import harness, plots
from effx.bench.memory import LONG_OPTIONS

FLAGS = flags.FLAGS

COLUMNS = ("family", "backend", "ran_on", "length", "mode", "status", "time_median_s", "time_min_s", "time_max_s",
           "temp_bytes", "peak_bytes", "flops", "achieved_flops_per_s", "roofline_fraction",
           "detail")
_LENGTH_OPTIONS = ("max_len",)  # options that must cover the longest length measured


def family_options(name: str, max_length: int) -> dict[str, Any]:
  options = dict(LONG_OPTIONS.get(name, {}))
  for key in _LENGTH_OPTIONS:
    if key in options:
      options[key] = max(options[key], max_length)
  return options


def _clusters(length: int, options: dict[str, Any]) -> int:
  window = options.get("window", routing.DEFAULT_WINDOW)
  return options.get("num_clusters") or routing.default_clusters(length, window)


def _span_keys(length: int, options: dict[str, Any]) -> int:
  """Keys per query of adaptive_span's band at its initial spans (the band ``lax.switch``
  picks: whole blocks, a power of two of them on each side)."""
  from effx.attention import adaptive_span  # noqa: PLC0415 (with the family registry)

  max_span, ramp = options.get("max_span", 1024), options.get("ramp", 32)
  block = min(adaptive_span.BLOCK, length)
  reach = min(max_span, math.ceil(options.get("init_span", 0.0) * max_span + ramp) - 1)
  widths = adaptive_span.widths(-(-length // block) * block, max_span, block)
  width = next(w for w in widths if w * block >= reach or w == widths[-1])
  return min(length, (2 * width + 1) * block)


def flops(name: str, length: int, *, batch: int, heads: int, head_dim: int,
          options: dict[str, Any], train: bool) -> float:
  """Analytic multiply-add FLOPs (x2) of the attention mixing, forward; x3 for ``train``.
  Counts the score and value matmuls of the keys each query really attends to (plus a
  family's projections, hashing or clustering); softmax and bookkeeping are ignored."""
  n, d, bh = length, head_dim, batch * heads
  o = {**ea.options(name), **options}
  per_query_keys = {
      "dense": n, "blockwise": n,
      "local": 2 * o.get("window", 128) + 1,
      "dilated": 2 * o.get("window", 64) + 1,
      "sparse": o.get("stride", 128) + n / o.get("stride", 128),
      "longformer": 2 * o.get("window", 128) + 1 + 2 * len(tuple(o.get("global_tokens", (0,)))),
      "bigbird": (3 + o.get("num_random_blocks", 3) + 2 * o.get("num_global_blocks", 2))
                 * o.get("block_size", 64),
      "lsh": o.get("n_hashes", 2) * 2 * o.get("bucket_size", 64),
      # each of k clusters: its w nearest queries x its w nearest keys
      "routing": _clusters(n, o) * min(n, o.get("window", routing.DEFAULT_WINDOW)) ** 2 / n,
      "sinkhorn": 2 * o.get("block_size", 64),
      "linformer": o.get("k", 256),
      "synthesizer": n,
      "nystrom": 2 * o.get("num_landmarks", 64),
      "performer": 2 * o.get("num_features", 256),
      "linear": d,
      "cosformer": 2 * d,
      # 3 blocks of Nr at level 0; at each coarser level 2^-l as many coarse queries
      # see 2 Nr coarse keys: about 4 Nr more per query over all levels
      "hierarchical": 7 * o.get("block_size", 16),
      # the band run at the initial spans (it follows the learned spans later)
      "adaptive_span": _span_keys(n, o),
  }.get(name, n)
  total = 4.0 * bh * n * per_query_keys * d
  if name == "synthesizer":
    total /= 2  # only A @ V: the attention matrix is synthesised, not Q K^T
  if name == "linformer":
    total += 4.0 * bh * n * o.get("k", 256) * d  # E K and F V
  if name == "routing":
    total += 2.0 * bh * n * _clusters(n, o) * d
  if name == "lsh":
    total += 2.0 * bh * n * d * o.get("n_hashes", 2) * (o.get("n_buckets") or 2 * n // 64) / 2
  return total * (3 if train else 1)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
  """One measurement (runs in its own process)."""
  # jax loads in the worker process only (a fresh process per measurement).
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from effx.attention import kernel  # noqa: PLC0415

  dtype = jnp.dtype(spec["dtype"])
  module = ea.make(spec["family"], causal=spec["causal"],
                   implementation=spec.get("backend", "auto"), **spec["options"])
  shape = (spec["batch"], spec["length"], spec["heads"], spec["head_dim"])
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v = (jax.random.normal(key, shape, dtype) for key in keys[:3])
  variables = module.init(keys[3], q, k, v)
  train = spec["mode"] == "train"

  def loss(variables, q, k, v):
    return jnp.sum(jnp.square(module.apply(variables, q, k, v).astype(jnp.float32)))

  fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)) if train
               else lambda variables, q, k, v: module.apply(variables, q, k, v))
  with kernel.recording() as seen:
    compiled = fn.lower(variables, q, k, v).compile()
  temp = int(compiled.memory_analysis().temp_size_in_bytes)
  result = {"status": "ok", "temp_bytes": temp, "ran_on": ",".join(sorted(seen)) or "xla"}
  if spec.get("max_bytes") and temp > spec["max_bytes"]:
    need, free = temp / 2**30, spec["max_bytes"] / 2**30
    return {**result, "status": "oom",
            "detail": f"needs {need:.1f} GiB of temporaries, {free:.1f} GiB usable"}
  result.update(harness.time_call(lambda: compiled(variables, q, k, v), spec["repeat"]))
  result["peak_bytes"] = harness.peak_bytes()
  return result


def check_families(text: str) -> list[str]:
  if text == "all":
    return list(ea.names())
  families = [f for f in text.split(",") if f]
  unknown = [f for f in families if f not in ea.names()]
  if unknown or not families:
    raise ValueError(f"--families: unknown family {', '.join(map(repr, unknown))}; "
                     f"registered: {', '.join(ea.names())} (or 'all')")
  return families


def check_backends(text: str) -> tuple[str, ...]:
  known = {b for name in ea.names() for b in ea.backends(name)}
  backends = tuple(b for b in text.split(",") if b)
  unknown = [b for b in backends if b not in known]
  if unknown or not backends:
    raise ValueError(f"--backends: unknown backend {', '.join(map(repr, unknown))}; "
                     f"known: {', '.join(sorted(known))}")
  return backends


def run(families, lengths, *, mode="train", batch=1, heads=4, head_dim=64, dtype="float32",
        causal=False, repeat=5, out=None, timeout_s=600.0, progress=True,
        backends=("xla",)) -> list[dict]:
  """Measures every (family, backend it has, length); writes outputs to ``out`` if
  given."""
  if mode not in ("infer", "train"):
    raise ValueError(f"--mode={mode!r} must be 'infer' or 'train'")
  if causal:
    families = [f for f in families if ea.supports_causal(f)]
  ceiling = harness.roofline()
  free = harness.available_memory_bytes()
  rows = []
  runs = {(f, b) for f in families for b in backends
          if b in ea.backends(f) and _builds(f, b, causal, max(lengths))}
  configs = [(f, b, n) for f in families for b in backends if (f, b) in runs
             for n in lengths]
  for family, backend, length in tqdm(configs, desc="attention", unit="config",
                                      disable=not progress):
    options = family_options(family, max(lengths))
    spec = dict(family=family, backend=backend, length=length, mode=mode, batch=batch,
                heads=heads, head_dim=head_dim, dtype=dtype, causal=causal, options=options,
                repeat=repeat, max_bytes=int(0.7 * free) if free else None)
    row = {"family": family, "backend": backend, "length": length, "mode": mode,
           "series": family if len(backends) == 1 else f"{family} ({backend})",
           **harness.run_isolated("effx.bench.attention", spec, timeout_s)}
    row["flops"] = flops(family, length, batch=batch, heads=heads, head_dim=head_dim,
                         options=options, train=mode == "train")
    if row.get("status") == "ok":
      row["achieved_flops_per_s"] = row["flops"] / row["time_median_s"]
      row["roofline_fraction"] = row["achieved_flops_per_s"] / ceiling["matmul_flops_per_s"]
    rows.append(row)
  if out:
    write_outputs(out, rows, ceiling, dict(mode=mode, batch=batch, heads=heads,
                                           head_dim=head_dim, dtype=dtype, causal=causal),
                  lacking=[(f, b) for f in families for b in backends
                           if (f, b) not in runs])
  return rows


def _builds(family: str, backend: str, causal: bool, length: int) -> bool:
  """Whether the family takes the backend with these options (causal ``local`` only on
  cuDNN, the factorized ``synthesizer`` only on Pallas and splash)."""
  try:
    ea.make(family, causal=causal, implementation=backend, **family_options(family, length))
  except ValueError:
    return False
  return True


def crossovers(rows, baseline: str) -> dict[str, int | None]:
  """Shortest length at which each series (a family, or a family on a backend) is faster
  than the series ``baseline``."""
  times = {(r["series"], r["length"]): r["time_median_s"] for r in rows
           if r.get("status") == "ok"}
  base_failed = {r["length"] for r in rows if r["series"] == baseline and r.get("status") != "ok"}
  result = {}
  for family in dict.fromkeys(r["series"] for r in rows):
    faster = [n for (f, n), t in times.items() if f == family and
              (n in base_failed or ((baseline, n) in times and t < times[(baseline, n)]))]
    result[family] = min(faster) if faster else None
  return result


def _baselines(rows) -> tuple[str, str]:
  """The dense and blockwise series to compare against (cuDNN's dense when measured)."""
  series = [r["series"] for r in rows]
  dense = next((s for s in ("dense (cudnn)", "dense (xla)", "dense") if s in series), "dense")
  blockwise = next((s for s in ("blockwise (xla)", "blockwise") if s in series), "blockwise")
  return dense, blockwise


def write_outputs(out: str, rows, ceiling, shape, lacking=()) -> None:
  os.makedirs(out, exist_ok=True)
  harness.write_csv(os.path.join(out, "results.csv"), rows, COLUMNS)
  with open(os.path.join(out, "meta.json"), "w", encoding="utf-8") as f:
    json.dump({"command": harness.command_line(), **harness.device_info(), **ceiling, **shape},
              f, indent=2)
  title = (f"{shape['mode']}, batch {shape['batch']}, {shape['heads']} heads x "
           f"{shape['head_dim']}, {shape['dtype']}" + (", causal" if shape["causal"] else ""))
  plots.lines_vs_length(rows, "time_median_s", "seconds", f"attention time ({title})",
                        os.path.join(out, "time.png"), series="series")
  plots.lines_vs_length(rows, "temp_bytes", "bytes (XLA temporaries)",
                        f"attention memory ({title})", os.path.join(out, "memory.png"),
                        series="series")
  plots.lines_vs_length(rows, "peak_bytes", "bytes (process peak)",
                        f"attention peak memory ({title})", os.path.join(out, "peak.png"),
                        series="series")
  info = harness.device_info()
  dense, blockwise = _baselines(rows)
  cross = {"dense": crossovers(rows, dense), "blockwise": crossovers(rows, blockwise)}
  lines = [f"# Attention benchmark: {title}", "", "```", harness.command_line(), "```", "",
           f"Device: {info['device']}; jax {info['jax']}; Python {info['python']}; "
           f"{info['cpu_count']} CPUs.", "",
           f"Measured ceilings: matmul {ceiling['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, "
           f"copy {ceiling['copy_bytes_per_s'] / 1e9:.1f} GB/s.", "",
           "![time](time.png) ![memory](memory.png)", "",
           f"| family | faster than {dense} from | faster than {blockwise} from | "
           "% of matmul ceiling at longest ok length |", "| --- | --- | --- | --- |"]
  for family in cross["dense"]:
    ok = [r for r in rows if r["series"] == family and r.get("status") == "ok"]
    frac = f"{100 * ok[-1]['roofline_fraction']:.1f}%" if ok else "-"
    lines.append(f"| {family} | {cross['dense'][family] or '-'} | "
                 f"{cross['blockwise'].get(family) or '-'} | {frac} |")
  failed = [r for r in rows if r.get("status") != "ok"]
  if failed:
    lines += ["", "Not measured: " + "; ".join(f"{r['series']}@{r['length']}: {r['status']}"
                                                for r in failed) + "."]
  if lacking:
    lines += ["", "No such backend: " + ", ".join(f"{f} on {b}" for f, b in lacking) + "."]
  with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def print_table(rows) -> None:
  lengths = sorted({r["length"] for r in rows})
  print(f"{'family':20s}" + "".join(f"{n:>11d}" for n in lengths) + "   (ms; MiB temp)")
  for family in dict.fromkeys(r["series"] for r in rows):
    cells = []
    for n in lengths:
      r = next(r for r in rows if r["series"] == family and r["length"] == n)
      cells.append(f"{1e3 * r['time_median_s']:8.1f}/{r['temp_bytes'] / 2**20:<6.0f}"
                   if r.get("status") == "ok" else f"{r.get('status'):>11s}")
    print(f"{family:20s}" + " ".join(cells))


def define_flags() -> None:
  flags.DEFINE_string("worker", None, "internal: one measurement (JSON spec)")
  flags.DEFINE_string("families", "all", "comma-separated names, or 'all'")
  flags.DEFINE_string("backends", "xla", "comma-separated: xla, pallas (interpret mode off "
                      "a GPU), splash (interpret mode off a TPU), cudnn (dense, GPU); each "
                      "family runs on those it has")
  flags.DEFINE_string("lengths", "512,1024,2048,4096,8192,16384", "comma-separated lengths")
  flags.DEFINE_enum("mode", "train", ["infer", "train"], "forward, or forward + backward")
  flags.DEFINE_integer("batch", 1, "batch size")
  flags.DEFINE_integer("heads", 4, "attention heads")
  flags.DEFINE_integer("head-dim", 64, "width of a head")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "q, k, v dtype")
  flags.DEFINE_bool("causal", False, "causal attention (families that cannot are skipped)")
  flags.DEFINE_integer("repeat", 5, "timed runs (median reported)")
  flags.DEFINE_float("timeout-s", 600.0, "per configuration")
  flags.DEFINE_string("out", None, "folder for results.csv, PNGs, README.md")


def main() -> None:
  if FLAGS.worker:
    print(json.dumps(worker(json.loads(FLAGS.worker))))
    return
  rows = run(check_families(FLAGS.families), harness.parse_lengths(FLAGS.lengths),
             mode=FLAGS.mode, batch=FLAGS.batch, heads=FLAGS.heads,
             head_dim=FLAGS["head-dim"].value, dtype=FLAGS.dtype, causal=FLAGS.causal,
             repeat=FLAGS.repeat, out=FLAGS.out, timeout_s=FLAGS["timeout-s"].value,
             backends=check_backends(FLAGS.backends))
  print_table(rows)


if __name__ == "__main__":
  cli.run(define_flags, main)

"""The LRA efficiency benchmark (Tay et al. 2020, Table 2) for every attention family.

  python -m effx.bench.lra_efficiency --lengths=1024,2048,3072,4096 --batch=1 \\
      --out=experiments/results/cpu/lra_efficiency

The byte-level Text model (4 layers, emb 256, qkv 256, 4 heads, MLP 1024, CLS pooling,
vocab 257), a full training step (forward, backward, AdamW update, donated state) per
family and length, each in a fresh subprocess: steps per second (median of ``--repeat``
after a warm-up), XLA's compiled temporary bytes of the step, and the process's peak
memory; each also as a ratio to the dense Transformer measured in the same run. LRA used
batch 32 on a 4x4 TPU v3; pick what fits your device and say so.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import flags
from tqdm import tqdm

from effx import cli
from effx.bench import attention as bench_attention
from effx.bench import harness, plots

FLAGS = flags.FLAGS

COLUMNS = ("family", "length", "status", "steps_per_s", "time_median_s", "time_min_s",
           "time_max_s", "temp_bytes", "peak_bytes", "speed_vs_dense", "memory_vs_dense",
           "peak_vs_dense", "detail")
TEXT_MODEL = dict(kind="classifier", vocab_size=257, num_classes=2, num_layers=4,
                  emb_dim=256, qkv_dim=256, num_heads=4, mlp_dim=1024, dropout_rate=0.1,
                  attention_dropout_rate=0.1, pool="cls")


def worker(spec: dict[str, Any]) -> dict[str, Any]:
  # jax and the model load in the worker process only: each measurement runs in a
  # fresh process (effx.bench.harness), the parent never initialises a backend.
  import functools  # noqa: PLC0415

  import flax.linen as nn  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import ml_collections  # noqa: PLC0415

  from effx import models  # noqa: PLC0415
  from effx.training import objectives, optim, steps  # noqa: PLC0415

  length, batch = spec["length"], spec["batch"]
  model = models.build(dict(TEXT_MODEL, max_len=length, attention=spec["family"],
                            attention_kwargs=spec["options"], dtype=spec["dtype"]))
  config = ml_collections.ConfigDict(dict(
      learning_rate=0.05, warmup_steps=8000, num_train_steps=20000, schedule="rsqrt",
      weight_decay=0.1, adam_b1=0.9, adam_b2=0.98, grad_clip_norm=0.0))
  tx = optim.optimizer(config)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, length), 1, 257)
  batch_dict = {"inputs": tokens, "targets": jnp.zeros((batch,), jnp.int32)}
  # Jitted: op-by-op initialisation of the model took ~10 s of every worker.
  variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), tokens[:1]))
  params = variables.pop("params")
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), model_state=dict(variables))
  step = jax.jit(functools.partial(steps.train_step, objective=objectives.Classification(model),
                                   tx=tx, schedule=optim.schedule(config),
                                   dropout_key=jax.random.PRNGKey(2)), donate_argnums=(0,))
  compiled = step.lower(state, batch_dict).compile()
  temp = int(compiled.memory_analysis().temp_size_in_bytes)
  if spec.get("max_bytes") and temp > spec["max_bytes"]:
    return {"status": "oom", "temp_bytes": temp, "detail": f"needs {temp / 2**30:.1f} GiB"}
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch_dict)
    return metrics["loss"]

  result = {"status": "ok", "temp_bytes": temp,
            **harness.time_call(one_step, spec["repeat"])}
  result["steps_per_s"] = 1.0 / result["time_median_s"]
  result["peak_bytes"] = harness.peak_bytes()
  return result


def run(families, lengths, *, batch=1, dtype="float32", repeat=3, out=None,
        timeout_s=900.0, progress=True) -> list[dict]:
  free = harness.available_memory_bytes()
  rows = []
  configs = [(f, n) for n in lengths for f in families]
  for family, length in tqdm(configs, desc="lra_efficiency", unit="config",
                             disable=not progress):
    spec = dict(family=family, length=length, batch=batch, dtype=dtype, repeat=repeat,
                options=bench_attention.family_options(family, max(lengths) + 1),
                max_bytes=int(0.7 * free) if free else None)
    rows.append({"family": family, "length": length,
                 **harness.run_isolated("effx.bench.lra_efficiency", spec, timeout_s)})
  for row in rows:
    dense = next((r for r in rows if r["family"] == "dense" and r["length"] == row["length"]
                  and r.get("status") == "ok"), None)
    if dense and row.get("status") == "ok":
      row["speed_vs_dense"] = row["steps_per_s"] / dense["steps_per_s"]
      row["memory_vs_dense"] = row["temp_bytes"] / dense["temp_bytes"]
      row["peak_vs_dense"] = row["peak_bytes"] / dense["peak_bytes"]
  if out:
    write_outputs(out, rows, lengths, batch, dtype)
  return rows


def table(rows, lengths) -> list[str]:
  head = ("| family | " + " | ".join(f"{n} steps/s" for n in lengths) + " | "
          + " | ".join(f"{n} temp MiB" for n in lengths) + " |")
  lines = [head, "|" + " --- |" * (1 + 2 * len(lengths))]
  for family in dict.fromkeys(r["family"] for r in rows):
    speed, memory = [], []
    for n in lengths:
      r = next(r for r in rows if r["family"] == family and r["length"] == n)
      if r.get("status") != "ok":
        speed.append(r.get("status", "?"))
        memory.append(f"{r['temp_bytes'] / 2**20:.0f}" if r.get("temp_bytes") else "-")
        continue
      ratio = r.get("speed_vs_dense")
      speed.append(f"{r['steps_per_s']:.2f}" + (f" ({ratio:.1f}x)" if ratio else ""))
      mratio = r.get("memory_vs_dense")
      memory.append(f"{r['temp_bytes'] / 2**20:.0f}" + (f" ({mratio:.2f}x)" if mratio else ""))
    lines.append(f"| {family} | " + " | ".join(speed) + " | " + " | ".join(memory) + " |")
  return lines


def write_outputs(out, rows, lengths, batch, dtype) -> None:
  os.makedirs(out, exist_ok=True)
  harness.write_csv(os.path.join(out, "results.csv"), rows, COLUMNS)
  title = f"LRA Text model train step, batch {batch}, {dtype}"
  plots.lines_vs_length(rows, "time_median_s", "seconds per step", title,
                        os.path.join(out, "step_time.png"))
  plots.lines_vs_length(rows, "temp_bytes", "bytes (XLA temporaries)", title,
                        os.path.join(out, "memory.png"))
  info = harness.device_info()
  lines = [f"# LRA efficiency: {title}", "", "```", harness.command_line(), "```", "",
           f"Device: {info['device']}; jax {info['jax']}; Python {info['python']}; "
           f"{info['cpu_count']} CPUs. Ratios are to dense attention in the same run.", "",
           "![step time](step_time.png) ![memory](memory.png)", "", *table(rows, lengths)]
  with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def define_flags() -> None:
  flags.DEFINE_string("worker", None, "internal: one measurement (JSON spec)")
  flags.DEFINE_string("families", "all", "comma-separated names, or 'all'")
  flags.DEFINE_string("lengths", "1024,2048,3072,4096", "comma-separated lengths")
  flags.DEFINE_integer("batch", 1, "batch size")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "model dtype")
  flags.DEFINE_integer("repeat", 3, "timed steps (median reported)")
  flags.DEFINE_float("timeout-s", 900.0, "per configuration")
  flags.DEFINE_string("out", None, "folder for results.csv, PNGs, README.md")


def main() -> None:
  if FLAGS.worker:
    print(json.dumps(worker(json.loads(FLAGS.worker))))
    return
  families = bench_attention.check_families(FLAGS.families)
  if "dense" not in families:
    families = ["dense", *families]  # ratios need it
  lengths = harness.parse_lengths(FLAGS.lengths)
  rows = run(families, lengths, batch=FLAGS.batch, dtype=FLAGS.dtype, repeat=FLAGS.repeat,
             out=FLAGS.out, timeout_s=FLAGS["timeout-s"].value)
  print("\n".join(table(rows, lengths)))


if __name__ == "__main__":
  cli.run(define_flags, main)

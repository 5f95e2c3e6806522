"""Attention backends on a TPU, compiled ahead of time on any machine with libtpu.

  pip install -e '.[tpu]'   # libtpu, the TPU compiler; no TPU needed
  python -m effx.bench.tpu_aot --topology=v5e:2x2 --out=experiments/results/tpu_aot

Compiles the training step (``effx.training.aot.check``: the trainer's own step, model,
optimizer and sharding) of two models for ``--topology``, once per attention family and
backend: the LRA Text model (``configs/lra_text.py``: 4 layers, width 256, 4 heads,
length 4000, batch 32) with every family on the block-sparse kernel, on ``xla`` and on
``splash`` where the family has it (``auto`` where it has not, which shows the fallback
and its reason); and local attention at 16K tokens in two models: Path-X's
(``configs/lra_pathx.py``: 1 layer, 2 heads of 8) and the Text model at 16384 tokens with
2 heads of 128 and batch 8 (splash's operands keep the head dimension minor, padded to
the TPU's 128 lanes, so narrow heads cost it memory the XLA kernel's layouts avoid).
Records per row whether it compiled, XLA's per-device memory (arguments + outputs +
temporaries - donated aliases) and temporaries, ``cost_analysis()`` flops and bytes per
device, the backend the attention traced to, and the compile time; writes
``results.csv``, ``memory.png`` and ``README.md`` (command, versions) to ``--out``. Each
compile runs in its own process; rerun with the same ``--out`` and the rows already in
its ``results.csv`` (same topology, model, family, backend) are kept, not recompiled.
"""

from __future__ import annotations

import csv
import json
import os
import time

from absl import flags

from effx import cli

FLAGS = flags.FLAGS

# Families on the block-sparse kernel, with the options that make them run at 4000
# tokens (the synthesizer's factorized mode is the one the kernel serves).
FAMILIES = {
    "dense": {}, "blockwise": {}, "local": {}, "dilated": {}, "sparse": {},
    "longformer": {}, "bigbird": {}, "lsh": {},
    "synthesizer": {"mode": "factorized_random", "max_len": 4096},
}
MODELS = {"text_4k": ("configs/lra_text.py", {}),
          "local_16k": ("configs/lra_pathx.py", {}),
          "text_16k_d128": ("configs/lra_text.py", {"data.max_len": 16384, "batch_size": 8,
                                                    "model.num_heads": 2})}
COLUMNS = ("topology", "model", "family", "asked", "attention_backend", "status",
           "per_device_gib", "temp_gib", "flops", "bytes_accessed", "compile_s", "detail")


def trials(families) -> list[dict]:
  """The (model, family, backend asked for) rows to compile."""
  import effx.attention as ea  # noqa: PLC0415 (jax: not needed by --help)

  rows = []
  for family in families:
    asked = [b for b in ("xla", "splash") if b in ea.backends(family)]
    rows += [dict(model="text_4k", family=family, asked=b)
             for b in (asked if "splash" in asked else [*asked, "auto"])]
  rows += [dict(model=m, family="local", asked=b) for m in ("local_16k", "text_16k_d128")
           for b in ("xla", "splash")]
  return rows


def worker(spec: dict) -> dict:
  """One compile (run in a subprocess by ``run``)."""
  from effx.training import aot  # noqa: PLC0415 (jax: not needed by --help)

  path, overrides = MODELS[spec["model"]]
  config = cli.load_config(path)
  for key, value in overrides.items():
    cli.set_value(config, key, value)
  config.model.attention = spec["family"]
  config.model.attention_kwargs = dict(FAMILIES.get(spec["family"], {}))
  config.model.implementation = spec["asked"]
  start = time.perf_counter()
  try:
    result = aot.check(config, spec["topology"])
  except ValueError as error:
    fits = "does not fit" not in str(error)  # else the compiler's own verdict
    return {"status": "error" if fits else "does not fit", "detail": str(error)[:300],
            "compile_s": round(time.perf_counter() - start, 1)}
  return {"status": "ok", "attention_backend": result["attention_backend"],
          "per_device_gib": round(result["per_device_bytes"] / 2**30, 3),
          "temp_gib": round(result["temp_bytes"] / 2**30, 3),
          "flops": result["flops"], "bytes_accessed": result["bytes_accessed"],
          "compile_s": round(time.perf_counter() - start, 1)}


def run(families, topology: str, out: str | None, timeout_s: float = 1200) -> list[dict]:
  """Compiles every trial in its own process; writes the results to ``out``."""
  from tqdm import tqdm  # noqa: PLC0415 (a progress bar for a long run)

  from effx.bench import harness  # noqa: PLC0415

  done = {}
  if out and os.path.exists(os.path.join(out, "results.csv")):
    with open(os.path.join(out, "results.csv"), newline="", encoding="utf-8") as f:
      done = {_key(r): r for r in csv.DictReader(f) if r["status"] in ("ok", "does not fit")}
  rows = []
  for spec in tqdm(trials(families), desc="tpu aot", unit="compile"):
    spec = {**spec, "topology": topology}
    rows.append(done.get(_key(spec)) or {
        **spec, **harness.run_isolated("effx.bench.tpu_aot", spec, timeout_s)})
    if out:
      write(rows, topology, out)
  return rows


def _key(row) -> tuple:
  return tuple(row.get(k) for k in ("topology", "model", "family", "asked"))


def write(rows, topology: str, out: str) -> None:
  import jax  # noqa: PLC0415
  import matplotlib  # noqa: PLC0415 (plotting only when writing results)

  from effx.bench import harness  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  os.makedirs(out, exist_ok=True)
  harness.write_csv(os.path.join(out, "results.csv"), rows, COLUMNS)
  ok = [r for r in rows if r["status"] == "ok"]
  fig, ax = plt.subplots(figsize=(8, 0.35 * max(len(ok), 4) + 1))
  labels = [f"{r['model']} {r['family']} ({r['attention_backend'].split(' ')[0]})" for r in ok]
  ax.barh(labels, [float(r["per_device_gib"]) for r in ok], color=[  # CSV rows: text
      "tab:orange" if "splash" in r["attention_backend"] else "tab:blue" for r in ok])
  ax.invert_yaxis()
  ax.set_xlabel(f"compiled per-device memory (GiB), {topology}")
  ax.set_title("training step: XLA kernel (blue) vs splash attention (orange)", fontsize=10)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "memory.png"), dpi=110)
  plt.close(fig)
  lines = [f"# Attention backends compiled for TPU {topology} ahead of time", "", "```",
           harness.command_line(), "```", "",
           f"jax {jax.__version__}; libtpu {_libtpu_version()}; compiled on a CPU host, no "
           "TPU. Per-device memory = arguments + outputs + temporaries - donated aliases "
           "(XLA's `memory_analysis()`); flops and bytes per device from "
           "`cost_analysis()` (Pallas kernels count as custom calls, so splash's work is "
           "missing from its flops).", "", "![memory](memory.png)", "",
           "| model | family | asked | traced to | status | GiB per device | temp GiB | "
           "GFLOP | GB accessed | compile s |", "| --- | --- | --- | --- | --- | --- | --- | "
           "--- | --- | --- |"]
  for r in rows:
    gflop = "" if r.get("flops") in (None, "") else f"{float(r['flops']) / 1e9:.0f}"
    gb = ("" if r.get("bytes_accessed") in (None, "")
          else f"{float(r['bytes_accessed']) / 1e9:.1f}")
    status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('detail', '')}"
    lines.append(f"| {r['model']} | {r['family']} | {r['asked']} | "
                 f"{r.get('attention_backend', '')} | {status} | {r.get('per_device_gib', '')} "
                 f"| {r.get('temp_gib', '')} | {gflop} | {gb} | {r.get('compile_s', '')} |")
  with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def _libtpu_version() -> str:
  from importlib import metadata  # noqa: PLC0415

  try:
    return metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    return "not installed"


def define_flags() -> None:
  flags.DEFINE_string("worker", None, "internal: one compile (JSON spec)")
  flags.DEFINE_string("topology", "v5e:2x2", "TPU topology, e.g. v5e:2x2")
  flags.DEFINE_string("families", ",".join(FAMILIES), "comma-separated families")
  flags.DEFINE_string("out", None, "folder for results.csv, memory.png, README.md")


def main() -> None:
  if FLAGS.worker:
    print(json.dumps(worker(json.loads(FLAGS.worker))))
    return
  from effx.bench.attention import check_families  # noqa: PLC0415 (jax: not for --help)

  rows = run(check_families(FLAGS.families), FLAGS.topology, FLAGS.out)
  for r in rows:
    print(f"{r['model']:10s} {r['family']:12s} {r['asked']:7s} {r['status']:14s} "
          f"{r.get('per_device_gib', '')}")


if __name__ == "__main__":
  cli.run(define_flags, main)

"""Size, latency and accuracy of a teacher and its compact students, side by side.

  python -m effx.bench.students --workdirs=/tmp/teacher,/tmp/student,/tmp/student_int8 \\
      --out=experiments/results/cpu/compact_students

Each workdir (an ``effx.train`` run, or an export of ``effx.structured`` /
``effx.quantize``) is measured in a fresh process, one after the other in one run: its
best checkpoint's parameters (count, and bytes from bit widths: int8 one byte, int4 half
a byte, scales and float leaves their dtype's size), the checkpoint's bytes on disk, the
forward pass's latency (mean ± standard deviation over ``--calls`` timed calls after
``--warmup`` untimed ones) at each ``--batches`` size on real test inputs, the
throughput, and test accuracy on the whole test split (read from the run's results when
they are of the same checkpoint and split, else evaluated). The first workdir is the
teacher unless ``--teacher`` names another: the table gives each run's size, latency
and accuracy relative to it. Writes
``students.csv``, ``students.md`` and ``students.png`` (accuracy against latency at the
largest batch, marker area proportional to bytes, the teacher marked).
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import time
from typing import Any

from absl import flags

from effx import cli
from effx.bench import harness

FLAGS = flags.FLAGS

COLUMNS = ("name", "workdir", "status", "parameters", "bytes", "disk_bytes", "test_accuracy",
           "step", "size_vs_teacher", "speedup_vs_teacher", "accuracy_delta", "detail")


def _accuracy(workdir: str, step: int, run, params, model_state) -> float:
  for path in glob.glob(os.path.join(workdir, f"eval_test_best_{step}.json")):
    with open(path, encoding="utf-8") as f:
      return float(json.load(f)["accuracy"])
  # results.json counts only when it tested the whole split (max_test_examples = 0):
  # every row must be measured on the same examples.
  results = os.path.join(workdir, "results.json")
  if os.path.exists(results) and not run.config.max_test_examples:
    with open(results, encoding="utf-8") as f:
      values = json.load(f)
    if values.get("best_step") == step and "test_accuracy" in values:
      return float(values["test_accuracy"])
  return float(run.evaluate(params, model_state, "test")["accuracy"])


def worker(spec: dict[str, Any]) -> dict[str, Any]:
  """Measures one workdir (in its own process)."""
  # jax and the training stack load in the worker process only (each measurement in a
  # fresh process: the parent never initialises a backend).
  import jax  # noqa: PLC0415
  import qwix  # noqa: PLC0415

  from effx.compress import quant  # noqa: PLC0415
  from effx.data import pipeline  # noqa: PLC0415
  from effx.training import objectives, restore  # noqa: PLC0415

  workdir = spec["workdir"]
  run, params, model_state, step = restore.restore(workdir, "best")
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, qwix.QArray))
  parameters = sum(int(x.qvalue.size) if isinstance(x, qwix.QArray) else int(x.size)
                   for x in leaves)
  disk = sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(os.path.join(workdir, "best", str(step)))
             for name in names)
  result = {"status": "ok", "parameters": parameters, "bytes": quant.size_bytes(params),
            "disk_bytes": disk, "step": step,
            "test_accuracy": _accuracy(workdir, step, run, params, model_state)}
  forward = jax.jit(lambda p, s, b: objectives.forward(run.model, p, s, b, train=False)[0])
  for batch_size in spec["batches"]:
    batch = next(pipeline.eval_batches(run.task.splits["test"], batch_size))
    batch = {k: v for k, v in batch.items() if k.startswith("inputs")}
    for _ in range(spec["warmup"]):
      jax.block_until_ready(forward(params, model_state, batch))
    times = []
    for _ in range(spec["calls"]):
      start = time.perf_counter()
      jax.block_until_ready(forward(params, model_state, batch))
      times.append(time.perf_counter() - start)
    mean = statistics.fmean(times)
    result[f"latency_b{batch_size}_ms"] = 1e3 * mean
    result[f"latency_b{batch_size}_std_ms"] = 1e3 * statistics.stdev(times)
    result[f"throughput_b{batch_size}"] = batch_size / mean
  return result


def run(workdirs: list[str], names: list[str], *, teacher: int, batches: list[int],
        calls: int, warmup: int, timeout_s: float, out: str | None) -> list[dict[str, Any]]:
  """Measures every workdir in a fresh process; returns the table's rows."""
  rows = []
  for i, (name, workdir) in enumerate(zip(names, workdirs)):
    print(f"[{i + 1}/{len(workdirs)}] {name}: {workdir}", flush=True)
    spec = {"workdir": workdir, "batches": batches, "calls": calls, "warmup": warmup}
    rows.append({"name": name, "workdir": workdir,
                 **harness.run_isolated("effx.bench.students", spec, timeout_s)})
  base = rows[teacher]
  last = f"latency_b{batches[-1]}_ms"
  for row in rows:
    if row.get("status") == "ok" and base.get("status") == "ok":
      row["size_vs_teacher"] = row["bytes"] / base["bytes"]
      row["speedup_vs_teacher"] = base[last] / row[last]
      row["accuracy_delta"] = row["test_accuracy"] - base["test_accuracy"]
  if out:
    os.makedirs(out, exist_ok=True)
    columns = list(COLUMNS)
    for b in batches:
      columns[-1:-1] = [f"latency_b{b}_ms", f"latency_b{b}_std_ms", f"throughput_b{b}"]
    harness.write_csv(os.path.join(out, "students.csv"), rows, columns)
    with open(os.path.join(out, "students.md"), "w", encoding="utf-8") as f:
      f.write("\n".join(table(rows, batches, teacher)) + "\n\n" + harness.command_line()
              + "\n\n" + json.dumps(harness.device_info()) + "\n")
    plot(rows, teacher, batches[-1], os.path.join(out, "students.png"))
  return rows


def table(rows, batches: list[int], teacher: int) -> list[str]:
  """The markdown table."""
  head = ["run", "parameters", "size (bytes)", *(f"latency b{b} (ms)" for b in batches),
          f"throughput b{batches[-1]} (ex/s)", "test accuracy", "size ×", "speed ×",
          "accuracy Δ"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for i, r in enumerate(rows):
    name = r["name"] + (" (teacher)" if i == teacher else "")
    if r.get("status") != "ok":
      lines.append(f"| {name} | {r.get('status')}: {r.get('detail')} |")
      continue
    lat = [f"{r[f'latency_b{b}_ms']:.2f} ± {r[f'latency_b{b}_std_ms']:.2f}" for b in batches]
    size = r.get("size_vs_teacher")
    lines.append("| " + " | ".join([
        name, f"{r['parameters']:,}", f"{r['bytes']:,}", *lat,
        f"{r[f'throughput_b{batches[-1]}']:.0f}", f"{100 * r['test_accuracy']:.1f}%",
        "" if size is None else f"{1 / size:.2f}× smaller",
        "" if size is None else f"{r['speedup_vs_teacher']:.2f}× faster",
        "" if size is None else f"{100 * r['accuracy_delta']:+.1f} pt"]) + " |")
  return lines


def plot(rows, teacher: int, batch: int, path: str) -> None:
  """Accuracy against latency at ``batch``; marker area proportional to bytes."""
  # pyplot only after the file-only backend is chosen.
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  ok = [(i, r) for i, r in enumerate(rows) if r.get("status") == "ok"]
  if not ok:
    return
  largest = max(r["bytes"] for _, r in ok)
  fig, ax = plt.subplots(figsize=(7.5, 5))
  for i, r in ok:
    x, y = r[f"latency_b{batch}_ms"], 100 * r["test_accuracy"]
    ax.scatter([x], [y], s=2000 * r["bytes"] / largest, alpha=0.45,
               color="tab:red" if i == teacher else "tab:blue", edgecolors="black")
    ax.annotate(r["name"] + (" (teacher)" if i == teacher else ""), (x, y), fontsize=8,
                xytext=(6, 6), textcoords="offset points")
  ax.set_xlabel(f"latency at batch {batch} (ms, mean of the timed calls)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("Compact students: accuracy vs latency (marker area ∝ bytes)", fontsize=10)
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def define_flags() -> None:
  flags.DEFINE_string("worker", None, "internal: one workdir's measurement (JSON spec)")
  flags.DEFINE_string("workdirs", None, "comma-separated workdirs; the first is the teacher "
                      "unless --teacher says otherwise")
  flags.DEFINE_string("names", "", "comma-separated labels (default: the workdirs' folder "
                      "names)")
  flags.DEFINE_string("teacher", "", "which workdir is the teacher")
  flags.DEFINE_string("batches", "1,32", "comma-separated batch sizes")
  flags.DEFINE_integer("calls", 100, "timed calls per batch size")
  flags.DEFINE_integer("warmup", 10, "untimed calls first")
  flags.DEFINE_float("timeout-s", 900.0, "per workdir")
  flags.DEFINE_string("out", None, "folder for the CSV, plot and README.md")


def main() -> None:
  if FLAGS.worker:
    print(json.dumps(worker(json.loads(FLAGS.worker))))
    return
  if not FLAGS.workdirs:
    raise ValueError("--workdirs is required")
  workdirs = [w for w in FLAGS.workdirs.split(",") if w]
  for w in workdirs:
    if not os.path.exists(os.path.join(w, "config.json")):
      raise ValueError(f"--workdirs: {w} is not an effx.train workdir (no config.json)")
  names = [n for n in FLAGS.names.split(",") if n] or [
      os.path.basename(os.path.normpath(w)) for w in workdirs]
  if len(names) != len(workdirs):
    raise ValueError(f"--names gives {len(names)} labels for {len(workdirs)} workdirs")
  teacher = 0
  if FLAGS.teacher:
    if FLAGS.teacher not in workdirs:
      raise ValueError(f"--teacher={FLAGS.teacher} is not one of --workdirs")
    teacher = workdirs.index(FLAGS.teacher)
  if FLAGS.calls < 2 or FLAGS.warmup < 0:
    raise ValueError("--calls must be at least 2 (for a standard deviation), --warmup >= 0")
  try:
    batches = [int(b) for b in FLAGS.batches.split(",")]
  except ValueError:
    raise ValueError(f"--batches={FLAGS.batches}: comma-separated batch sizes, "
                     "e.g. 1,32") from None
  if not batches or min(batches) <= 0:
    raise ValueError(f"--batches={FLAGS.batches}: batch sizes must be positive")
  rows = run(workdirs, names, teacher=teacher, batches=batches, calls=FLAGS.calls,
             warmup=FLAGS.warmup, timeout_s=FLAGS["timeout-s"].value, out=FLAGS.out)
  print("\n".join(table(rows, batches, teacher)))


if __name__ == "__main__":
  cli.run(define_flags, main)

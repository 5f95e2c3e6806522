"""Size, latency and accuracy of a teacher and its compact students, side by side, in
effx and as deployed artifacts.

  python -m effx.bench.students --workdirs=/tmp/teacher,/tmp/student,/tmp/student_int8 \\
      [--artifacts=/tmp/student_onnx,/tmp/student_onnx_int8] [--threads=1,all] \\
      --out=experiments/results/cpu/compact_students

Each entry is measured in a fresh process, one after the other in one run. An
``--workdirs`` entry (an ``effx.train`` run, or an export of ``effx.structured`` /
``effx.quantize``) runs in effx (its best checkpoint; "effx int8" for an integer
export); an ``--artifacts`` entry (a folder written by ``effx.export``) runs as deployed:
StableHLO through ``jax.export.deserialize(...).call``, ONNX in ONNX Runtime (float or
int8 dynamic / static, as its manifest says). For each: the bytes on disk (the best
checkpoint's folder, or the artifact's file), the parameters and their bytes from bit
widths (effx rows), the forward's latency (mean ± standard deviation over ``--calls``
timed calls after ``--warmup`` untimed ones) at each ``--batches`` size on real test
inputs, the throughput, and the quality on the whole test split, computed the same way
for every row from its own outputs: accuracy for classifiers, mean cosine similarity to
the original model's embeddings for distilled sentence encoders. ``--threads``: each
entry once per setting, ``1`` (the process pinned to one core; ORT given one intra-op
thread) and ``all`` (every core). The first entry is the teacher unless ``--teacher``
names another: the table gives each row's size on disk, latency and quality relative to
it. Writes ``students.csv``, ``students.md`` and ``students.png`` (quality against latency
at the largest batch, marker area proportional to bytes on disk, the teacher marked).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

from absl import flags

from effx import cli
from effx.bench import harness

FLAGS = flags.FLAGS

COLUMNS = ("name", "route", "threads", "workdir", "status", "parameters", "bytes",
           "disk_bytes", "metric", "test_accuracy", "step", "size_vs_teacher",
           "speedup_vs_teacher", "accuracy_delta", "detail")


def _route(manifest: dict) -> str:
  if manifest["format"] == "stablehlo":
    return "StableHLO"
  return {"none": "ORT fp32", "dynamic": "ORT int8 dynamic",
          "static": "ORT int8 static"}[manifest.get("int8", "none")]


def _quality(run, call, batch_size: int) -> tuple[str, float]:
  """``(metric, value)`` of ``call`` (input arrays -> outputs) over the whole test split:
  accuracy, or for a distilled sentence encoder its embeddings' mean cosine to the
  teacher's (the original model's)."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from effx.data import pipeline  # noqa: PLC0415
  from effx.training import objectives  # noqa: PLC0415

  objective = run.objective
  embedding = getattr(objective, "embedding", False)
  if run.task.kind == "lm":
    raise ValueError("a language model: its quality is bits per byte (python -m "
                     "effx.evaluate), not measured here")
  if embedding:
    teacher = jax.jit(lambda variables, batch: objectives.forward(
        objective.teacher_model, variables["params"], variables["model_state"], batch,
        train=False)[0])
  total, count = 0.0, 0.0
  for batch in pipeline.eval_batches(run.task.splits["test"], batch_size):
    outputs = np.asarray(call(batch), np.float32)
    weights = np.asarray(batch["weights"], np.float32)
    if embedding:
      target = np.asarray(teacher(run.extra, batch), np.float32)
      cosine = np.sum(outputs * target, -1) / (
          np.linalg.norm(outputs, axis=-1) * np.linalg.norm(target, axis=-1) + 1e-12)
      total += float(np.sum(cosine * weights))
    else:
      total += float(np.sum((np.argmax(outputs, -1) == batch["targets"]) * weights))
    count += float(np.sum(weights))
  return ("cosine" if embedding else "accuracy"), total / max(count, 1.0)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
  """Measures one workdir or artifact (in its own process)."""
  if spec.get("threads") == 1:
    # Before any backend starts its thread pools: one core for XLA and ORT alike.
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  # jax and the training stack load in the worker process only (each measurement in a
  # fresh process: the parent never initialises a backend).
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import qwix  # noqa: PLC0415

  from effx.compress import quant  # noqa: PLC0415
  from effx.data import pipeline  # noqa: PLC0415
  from effx.training import objectives, restore  # noqa: PLC0415

  result: dict[str, Any] = {"status": "ok"}
  keys = None
  if spec.get("artifact"):
    folder = spec["artifact"]
    with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
      manifest = json.load(f)
    path = os.path.join(folder, manifest["file"])
    run, _, _, step = restore.restore(manifest["workdir"], manifest["checkpoint"])
    keys = [x["name"] for x in manifest["inputs"]]
    fixed = manifest["inputs"][0]["shape"][0]
    fixed = int(fixed) if fixed.isdigit() else None
    if manifest["format"] == "stablehlo":
      with open(path, "rb") as f:
        exported = jax.export.deserialize(f.read())
      compiled = jax.jit(exported.call)
      call = lambda batch: compiled(*(batch[k] for k in keys))  # noqa: E731
    else:
      from effx.training import deploy_onnx  # noqa: PLC0415

      session = deploy_onnx.session(path, threads=1 if spec.get("threads") == 1 else 0)
      call = lambda batch: session.run(  # noqa: E731
          None, {k: np.asarray(batch[k], np.int32) for k in keys})[0]
    result.update(route=_route(manifest), disk_bytes=os.path.getsize(path), step=step,
                  workdir=manifest["workdir"])
  else:
    workdir = spec["workdir"]
    run, params, model_state, step = restore.restore(workdir, "best")
    fixed = None
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, qwix.QArray))
    integer = any(isinstance(x, qwix.QArray) for x in leaves)
    forward = jax.jit(lambda p, s, b: objectives.forward(run.model, p, s, b,
                                                         train=False)[0])
    call = lambda batch: forward(params, model_state, {  # noqa: E731
        k: v for k, v in batch.items() if k.startswith("inputs")})
    result.update(
        route="effx int8" if integer else "effx", step=step,
        parameters=sum(int(x.qvalue.size) if isinstance(x, qwix.QArray) else int(x.size)
                       for x in leaves),
        bytes=quant.size_bytes(params),
        disk_bytes=sum(os.path.getsize(os.path.join(root, name))
                       for root, _, names in os.walk(os.path.join(workdir, "best", str(step)))
                       for name in names))
  metric, value = _quality(run, call, fixed or 32)
  result.update(metric=metric, test_accuracy=value)
  for batch_size in spec["batches"]:
    if fixed is not None and batch_size != fixed:
      continue  # an artifact of one batch size: timed at that size only
    batch = next(pipeline.eval_batches(run.task.splits["test"], batch_size))
    batch = {k: v for k, v in batch.items() if k.startswith("inputs")}
    for _ in range(spec["warmup"]):
      jax.block_until_ready(call(batch))
    times = []
    for _ in range(spec["calls"]):
      start = time.perf_counter()
      jax.block_until_ready(call(batch))
      times.append(time.perf_counter() - start)
    mean = statistics.fmean(times)
    result[f"latency_b{batch_size}_ms"] = 1e3 * mean
    result[f"latency_b{batch_size}_std_ms"] = 1e3 * statistics.stdev(times)
    result[f"throughput_b{batch_size}"] = batch_size / mean
  return result


def run(workdirs: list[str], names: list[str], *, teacher: int, batches: list[int],
        calls: int, warmup: int, timeout_s: float, out: str | None,
        artifacts: tuple[bool, ...] | None = None,
        threads: tuple[int | str, ...] = ("all",)) -> list[dict[str, Any]]:
  """Measures every entry (a workdir, or an artifact folder where ``artifacts[i]``) in a
  fresh process, once per ``threads`` setting; returns the table's rows."""
  artifacts = artifacts or (False,) * len(workdirs)
  rows = []
  for setting in threads:
    for i, (name, path, artifact) in enumerate(zip(names, workdirs, artifacts)):
      print(f"[{len(rows) + 1}/{len(workdirs) * len(threads)}] {name} ({setting} "
            f"thread{'s' if setting != 1 else ''}): {path}", flush=True)
      spec = {"artifact" if artifact else "workdir": path, "batches": batches,
              "calls": calls, "warmup": warmup, "threads": setting}
      rows.append({"name": name, "workdir": path, "threads": setting, "teacher": i == teacher,
                   **harness.run_isolated("effx.bench.students", spec, timeout_s)})
  last = f"latency_b{batches[-1]}_ms"
  for row in rows:
    base = next(r for r in rows if r["teacher"] and r["threads"] == row["threads"])
    if row.get("status") == "ok" and base.get("status") == "ok":
      row["size_vs_teacher"] = row["disk_bytes"] / base["disk_bytes"]
      if last in row and last in base:
        row["speedup_vs_teacher"] = base[last] / row[last]
      if row.get("metric") == base.get("metric"):
        row["accuracy_delta"] = row["test_accuracy"] - base["test_accuracy"]
  if out:
    os.makedirs(out, exist_ok=True)
    columns = list(COLUMNS)
    for b in batches:
      columns[-1:-1] = [f"latency_b{b}_ms", f"latency_b{b}_std_ms", f"throughput_b{b}"]
    harness.write_csv(os.path.join(out, "students.csv"), rows, columns)
    with open(os.path.join(out, "students.md"), "w", encoding="utf-8") as f:
      f.write("\n".join(table(rows, batches)) + "\n\n" + harness.command_line()
              + "\n\n" + json.dumps(harness.device_info()) + "\n")
    plot(rows, batches[-1], os.path.join(out, "students.png"))
  return rows


def _quality_text(row) -> str:
  if row.get("metric") == "cosine":
    return f"cos {row['test_accuracy']:.4f}"
  return f"{100 * row['test_accuracy']:.1f}%"


def table(rows, batches: list[int]) -> list[str]:
  """The markdown table (sizes, speeds and quality relative to the teacher's row with the
  same thread setting)."""
  head = ["run", "route", "threads", "parameters", "on disk (bytes)",
          *(f"latency b{b} (ms)" for b in batches), f"throughput b{batches[-1]} (ex/s)",
          "test quality", "size ×", "speed ×", "quality Δ"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    name = r["name"] + (" (teacher)" if r.get("teacher") else "")
    if r.get("status") != "ok":
      lines.append(f"| {name} | | {r['threads']} | {r.get('status')}: {r.get('detail')} |")
      continue
    lat = [f"{r[f'latency_b{b}_ms']:.2f} ± {r[f'latency_b{b}_std_ms']:.2f}"
           if f"latency_b{b}_ms" in r else "–" for b in batches]
    throughput = r.get(f"throughput_b{batches[-1]}")
    size, speed, delta = (r.get(k) for k in ("size_vs_teacher", "speedup_vs_teacher",
                                             "accuracy_delta"))
    lines.append("| " + " | ".join([
        name, r.get("route", ""), str(r["threads"]),
        f"{r['parameters']:,}" if "parameters" in r else "–", f"{r['disk_bytes']:,}",
        *lat, "–" if throughput is None else f"{throughput:.0f}", _quality_text(r),
        "" if size is None else f"{1 / size:.2f}× smaller",
        "" if speed is None else f"{speed:.2f}× faster",
        "" if delta is None else (f"{delta:+.4f}" if r.get("metric") == "cosine"
                                  else f"{100 * delta:+.1f} pt")]) + " |")
  return lines


def plot(rows, batch: int, path: str) -> None:
  """Quality against latency at ``batch``; marker area proportional to bytes on disk; one
  marker shape per thread setting."""
  # pyplot only after the file-only backend is chosen.
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  key = f"latency_b{batch}_ms"
  ok = [r for r in rows if r.get("status") == "ok" and key in r]
  if not ok:
    return
  largest = max(r["disk_bytes"] for r in ok)
  settings = list(dict.fromkeys(r["threads"] for r in ok))
  fig, ax = plt.subplots(figsize=(8, 5.5))
  for r in ok:
    x = r[key]
    y = r["test_accuracy"] if r.get("metric") == "cosine" else 100 * r["test_accuracy"]
    ax.scatter([x], [y], s=1500 * r["disk_bytes"] / largest + 10, alpha=0.45,
               marker="os^D"[settings.index(r["threads"]) % 4],
               color="tab:red" if r.get("teacher") else "tab:blue", edgecolors="black")
    label = f"{r['name']} [{r.get('route', '')}]" + (
        f" {r['threads']}t" if len(settings) > 1 else "")
    ax.annotate(label, (x, y), fontsize=7, xytext=(5, 4), textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel(f"latency at batch {batch} (ms, mean of the timed calls; log scale)")
  metric = ok[0].get("metric", "accuracy")
  ax.set_ylabel("test cosine to the original" if metric == "cosine" else "test accuracy (%)")
  shapes = ", ".join(f"{'os^D'[i % 4]} = {s} thread{'s' if s != 1 else ''}"
                     for i, s in enumerate(settings))
  ax.set_title(f"Compact students: quality vs latency (marker area ∝ bytes on disk; {shapes})",
               fontsize=9)
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def define_flags() -> None:
  flags.DEFINE_string("worker", None, "internal: one entry's measurement (JSON spec)")
  flags.DEFINE_string("workdirs", "", "comma-separated effx.train workdirs (run in effx); "
                      "the first entry is the teacher unless --teacher says otherwise")
  flags.DEFINE_string("artifacts", "", "comma-separated effx.export folders (StableHLO or "
                      "ONNX), measured after the workdirs")
  flags.DEFINE_string("names", "", "comma-separated labels, workdirs then artifacts "
                      "(default: the folder names)")
  flags.DEFINE_string("teacher", "", "which entry is the teacher")
  flags.DEFINE_string("batches", "1,32", "comma-separated batch sizes")
  flags.DEFINE_list("threads", ["all"], "each entry once per setting: 1 (one core) and/or "
                    "all (every core)")
  flags.DEFINE_integer("calls", 100, "timed calls per batch size")
  flags.DEFINE_integer("warmup", 10, "untimed calls first")
  flags.DEFINE_float("timeout-s", 900.0, "per entry")
  flags.DEFINE_string("out", None, "folder for the CSV, plot and table")


def main() -> None:
  if FLAGS.worker:
    print(json.dumps(worker(json.loads(FLAGS.worker))))
    return
  workdirs = [w for w in FLAGS.workdirs.split(",") if w]
  artifacts = [a for a in FLAGS.artifacts.split(",") if a]
  if not workdirs and not artifacts:
    raise ValueError("give --workdirs and/or --artifacts")
  for w in workdirs:
    if not os.path.exists(os.path.join(w, "config.json")):
      raise ValueError(f"--workdirs: {w} is not an effx.train workdir (no config.json)")
  for a in artifacts:
    if not os.path.exists(os.path.join(a, "manifest.json")):
      raise ValueError(f"--artifacts: {a} is not an effx.export folder (no manifest.json)")
  paths = workdirs + artifacts
  names = [n for n in FLAGS.names.split(",") if n] or [
      os.path.basename(os.path.normpath(p)) for p in paths]
  if len(names) != len(paths):
    raise ValueError(f"--names gives {len(names)} labels for {len(paths)} entries")
  teacher = 0
  if FLAGS.teacher:
    if FLAGS.teacher not in paths and FLAGS.teacher not in names:
      raise ValueError(f"--teacher={FLAGS.teacher} is not one of --workdirs / --artifacts "
                       "(or their --names)")
    teacher = (paths.index(FLAGS.teacher) if FLAGS.teacher in paths
               else names.index(FLAGS.teacher))
  if FLAGS.calls < 2 or FLAGS.warmup < 0:
    raise ValueError("--calls must be at least 2 (for a standard deviation), --warmup >= 0")
  try:
    batches = [int(b) for b in FLAGS.batches.split(",")]
  except ValueError:
    raise ValueError(f"--batches={FLAGS.batches}: comma-separated batch sizes, "
                     "e.g. 1,32") from None
  if not batches or min(batches) <= 0:
    raise ValueError(f"--batches={FLAGS.batches}: batch sizes must be positive")
  bad = [t for t in FLAGS.threads if t not in ("1", "all")]
  if bad or not FLAGS.threads:
    raise ValueError(f"--threads={','.join(FLAGS.threads)}: 1 and/or all")
  threads = tuple(1 if t == "1" else "all" for t in FLAGS.threads)
  rows = run(paths, names, teacher=teacher, batches=batches, calls=FLAGS.calls,
             warmup=FLAGS.warmup, timeout_s=FLAGS["timeout-s"].value, out=FLAGS.out,
             artifacts=(False,) * len(workdirs) + (True,) * len(artifacts), threads=threads)
  print("\n".join(table(rows, batches)))


if __name__ == "__main__":
  cli.run(define_flags, main)

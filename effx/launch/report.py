"""A sweep's results as tables and plots: ``results.md``, ``results.csv``,
``curves.png``, and for attention families x LRA tasks, LRA Table 1's layout and a heat
map (``table.png``)."""

from __future__ import annotations

import csv
import io
import os
import tempfile

import matplotlib
import numpy as np

from effx.common import files
from effx.launch.manifest import Manifest
from effx.launch.trials import trial_config, trial_spec
from effx.training import metrics

# LRA's column names and order (Tay et al. 2021, Table 1), by config file.
TASK_COLUMNS = {"lra_listops": "ListOps", "lra_text": "Text", "lra_retrieval": "Retrieval",
                "lra_image": "Image", "lra_pathfinder": "Pathfinder", "lra_pathx": "Path-X"}


def report(workdir: str, manifest: Manifest) -> list[str]:
  """Writes ``results.md``, ``results.csv`` and ``curves.png`` (and, for a sweep over
  attention families x tasks, LRA Table 1's layout first in ``results.md`` and a heat map
  ``table.png``); returns the lines of ``results.md``'s tables."""
  keys = list(dict.fromkeys(k for t in manifest.trials for k in t.overrides))
  rows = []
  for trial in manifest.trials:
    r = trial.results if trial.status == "done" else {}
    steps_per_s = (r["step"] / r["wall_time_s"]) if r.get("wall_time_s") else None
    rows.append({"trial": trial.name, **{k: trial.overrides.get(k, "") for k in keys},
                 "status": trial.status,
                 "test_accuracy": r.get("test_accuracy"), "eval_accuracy": r.get("eval_accuracy"),
                 "test_bpb": r.get("test_bpb"), "eval_bpb": r.get("eval_bpb"),
                 "test_cosine": r.get("test_cosine"), "eval_cosine": r.get("eval_cosine"),
                 "best_step": r.get("best_step"), "steps_per_s": steps_per_s,
                 "peak_memory_mb": (r["peak_memory_bytes"] / 2**20
                                    if r.get("peak_memory_bytes") else None),
                 "error": trial.error})
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
  writer.writeheader()
  writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
  files.write_text_atomic(os.path.join(workdir, "results.csv"), text.getvalue())
  # Language models are chosen by bits per byte, distilled sentence encoders by their
  # cosine to the teacher: show those columns instead.
  metric = "accuracy"
  for other in ("bpb", "cosine"):
    if (any(r[f"test_{other}"] is not None for r in rows)
        and all(r["test_accuracy"] is None for r in rows)):
      metric = other
  shown = ["trial", *keys, "status", f"test_{metric}", f"eval_{metric}", "steps_per_s",
           "peak_memory_mb"]
  lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
  for row in rows:
    cells = []
    for k in shown:
      v = row[k]
      if k in ("test_accuracy", "eval_accuracy"):
        v = "" if v is None else f"{100 * v:.1f}%"
      elif k in ("test_bpb", "eval_bpb", "test_cosine", "eval_cosine"):
        v = "" if v is None else f"{v:.4f}"
      elif k in ("steps_per_s", "peak_memory_mb"):
        v = "" if v is None else f"{v:.1f}"
      cells.append(str(v))
    lines.append("| " + " | ".join(cells) + " |")
  done = [r for r in rows if r["status"] == "done" and r["test_accuracy"] is not None]
  if done:
    mean = sum(r["test_accuracy"] for r in done) / len(done)
    lines.append(f"\nMean test accuracy over the {len(done)} finished of {len(rows)} trials: "
                 f"{100 * mean:.2f}%.")
  grid = families_by_tasks(manifest)
  if grid is not None:
    lines = [*_lra_table(*grid), "", *lines]
  files.write_text_atomic(
      os.path.join(workdir, "results.md"),
      f"Sweep {manifest.sweep or '(default)'} of `{manifest.spec}`\n\n" + "\n".join(lines)
      + "\n")
  _save_figure(_plot_curves(workdir, manifest), os.path.join(workdir, "curves.png"))
  if grid is not None:
    _save_figure(_plot_grid(*grid, title=f"sweep {manifest.sweep or '(default)'}"),
                 os.path.join(workdir, "table.png"))
  return lines


def families_by_tasks(manifest: Manifest):
  """``(families, tasks, {(family, task): trial})`` when the sweep's trials span more
  than one attention family and more than one task (config file), else None."""
  cells = {}
  for trial in manifest.trials:
    spec, _ = trial_spec(manifest.spec, trial.overrides)
    stem = os.path.splitext(os.path.basename(spec.partition(":")[0]))[0]
    family = trial_config(manifest.spec, trial.overrides).model.attention
    if (family, stem) in cells:
      return None  # another axis too (learning rates, sizes): one row per trial then
    cells[family, stem] = trial
  families = list(dict.fromkeys(f for f, _ in cells))
  order = list(TASK_COLUMNS)
  tasks = sorted(dict.fromkeys(t for _, t in cells),
                 key=lambda t: (order.index(t) if t in order else len(order), t))
  if len(families) < 2 or len(tasks) < 2:
    return None
  return families, tasks, cells


def _lra_table(families, tasks, cells) -> list[str]:
  """LRA Table 1's layout: a row per family, a column per task and their average (test
  accuracy of the best-on-validation checkpoint); unfinished cells show their status."""
  names = [TASK_COLUMNS.get(t, t) for t in tasks]
  lines = ["| Model | " + " | ".join(names) + " | Avg |", "|---|" + "---:|" * (len(tasks) + 1)]
  for family in families:
    cells_row, values = [], []
    for task in tasks:
      trial = cells.get((family, task))
      if trial is None:
        cells_row.append("")
      elif trial.status == "done":
        values.append(100 * trial.results["test_accuracy"])
        cells_row.append(f"{values[-1]:.2f}")
      else:
        cells_row.append(trial.status)
    average = f"{sum(values) / len(values):.2f}" if len(values) == len(tasks) else ""
    lines.append(f"| {family} | " + " | ".join(cells_row) + f" | {average} |")
  return lines


def _save_figure(fig, path: str) -> None:
  plt = _pyplot()
  with tempfile.TemporaryDirectory() as folder:
    local = os.path.join(folder, os.path.basename(path))
    fig.savefig(local, dpi=110)
    plt.close(fig)
    if files.is_remote(path):
      files.upload(local, path)
    else:
      os.replace(local, path)


def _pyplot():
  # pyplot only after the file-only backend is chosen (no display on clusters).
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415 (after the backend)

  return plt


def _plot_grid(families, tasks, cells, *, title: str):
  """A heat map of test accuracy, families x tasks; unfinished cells blank."""
  plt = _pyplot()
  values = np.full((len(families), len(tasks)), np.nan)
  for (family, task), trial in cells.items():
    if trial.status == "done":
      values[families.index(family), tasks.index(task)] = 100 * trial.results["test_accuracy"]
  fig, ax = plt.subplots(figsize=(1.4 * len(tasks) + 2.5, 0.38 * len(families) + 1.5))
  image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
  for i in range(len(families)):
    for j in range(len(tasks)):
      if not np.isnan(values[i, j]):
        ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=8,
                color="white" if values[i, j] < np.nanmean(values) else "black")
  ax.set_xticks(range(len(tasks)), [TASK_COLUMNS.get(t, t) for t in tasks])
  ax.set_yticks(range(len(families)), families)
  ax.set_title(f"{title}: test accuracy (%)", fontsize=10)
  fig.colorbar(image, ax=ax)
  fig.tight_layout()
  return fig


def _plot_curves(workdir: str, manifest: Manifest):
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 5))
  for trial in manifest.trials:
    if not files.exists(os.path.join(workdir, trial.name, "metrics.jsonl")):
      continue
    validation = [p for p in metrics.read(os.path.join(workdir, trial.name))
                  if p.get("split") == "validation"]
    key = "accuracy" if any("accuracy" in p for p in validation) else "cosine"
    points = [(p["step"], 100 * p[key]) for p in validation if key in p]
    if points:
      ax.plot(*zip(*points), marker="o", ms=3, label=f"{trial.name} ({trial.status})")
  ax.set_xlabel("step")
  ax.set_ylabel("validation accuracy (%; encoders: cosine to the teacher x 100)")
  ax.set_title(f"sweep {manifest.sweep or '(default)'}: validation curves", fontsize=10)
  ax.grid(True, alpha=0.3)
  if ax.lines:
    ax.legend(fontsize=7, ncol=2 if len(ax.lines) > 10 else 1)
  fig.tight_layout()
  return fig

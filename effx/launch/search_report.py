"""A search's study as tables and plots: ``results.md`` (the best trial and its
overrides, then every trial: state, value, parameters, steps, wall time),
``results.csv``, and Optuna's own plots drawn with matplotlib: ``history.png`` (the
objective by trial), ``slice.png`` (each parameter against the objective),
``importances.png`` (parameter importances) and ``intermediate.png`` (the validation
curves the pruner saw)."""

from __future__ import annotations

import csv
import io
import json
import os
import warnings

from effx.common import files
from effx.launch import report as report_lib

PLOTS = {"history": "plot_optimization_history", "slice": "plot_slice",
         "importances": "plot_param_importances", "intermediate": "plot_intermediate_values"}


def rows(study, metric: str) -> list[dict]:
  """One row per trial, in trial order (a trial queued again after an interruption is
  its own row, pointing to the one it continues)."""
  out = []
  trials = study.get_trials(deepcopy=False)
  # Which trial took over an interrupted or stale one (Optuna's retry keeps the history).
  successor = {}
  for t in trials:
    for number in t.system_attrs.get("retry_history", []):
      successor.setdefault(number, t.number)
  for t in trials:
    attrs = t.user_attrs
    results = attrs.get("results") or {}
    wall = (t.datetime_complete - t.datetime_start).total_seconds() if (
        t.datetime_complete and t.datetime_start) else None
    steps = results.get("step")
    if steps is None and t.intermediate_values:
      steps = max(t.intermediate_values)
    history = t.system_attrs.get("retry_history") or []
    continues = history[-1] if history else None  # the attempt this one takes over
    out.append({
        "trial": t.number, "state": t.state.name.lower(),
        "value": t.value if t.values else None,
        f"test_{metric}": results.get(f"test_{metric}"),
        **{f"param.{k}": v for k, v in t.params.items()},
        "steps": steps, "wall_time_s": wall, "workdir": attrs.get("workdir", ""),
        "continues": "" if continues is None else continues,
        "note": _note(t, successor.get(t.number)),
    })
  return out


def _note(trial, successor: int | None) -> str:
  """Why a trial ended as it did (the attributes a queued copy inherits are not its own
  until it runs)."""
  attrs, state = trial.user_attrs, trial.state.name
  if state == "PRUNED" and attrs.get("pruned_at") is not None:
    return f"pruned at step {attrs['pruned_at']}"
  if state != "FAIL":
    return ""
  if successor is not None:
    why = ("interrupted" if (attrs.get("error") or "").startswith("interrupted")
           else "its worker stopped (no heartbeat)")
    return f"{why}; continued by trial {successor}"
  return attrs.get("error") or ""


def _cell(key: str, value, metric: str) -> str:
  if value is None or value == "":
    return ""
  percent = metric in ("accuracy",) and key in ("value", f"test_{metric}")
  if percent:
    return f"{100 * value:.2f}%"
  if isinstance(value, float):
    return f"{value:.4g}" if key != "wall_time_s" else f"{value:.0f}"
  return str(value)


def report(workdir: str, study, record: dict) -> list[str]:
  """Writes ``results.md``, ``results.csv`` and the plots for the study of the search
  recorded in ``record`` (``search.json``); returns the lines of ``results.md``."""
  metric, direction = record["metric"], record["direction"]
  table = rows(study, metric)
  columns = list(dict.fromkeys(k for row in table for k in row))
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=columns or ["trial"], lineterminator="\n")
  writer.writeheader()
  writer.writerows({k: ("" if row.get(k) is None else row.get(k)) for k in columns}
                   for row in table)
  files.write_text_atomic(os.path.join(workdir, "results.csv"), text.getvalue())

  states = {}
  for row in table:
    states[row["state"]] = states.get(row["state"], 0) + 1
  lines = [f"Search `{record['search']}` of `{record['config']}`: study in "
           f"`{record['storage']}`; objective: the best validation {metric} of each run "
           f"({direction}). Trials: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
           + "."]
  complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
  if complete:
    best = study.best_trial
    results = best.user_attrs.get("results") or {}
    lines += ["", f"**Best: trial {best.number}**, validation {metric} "
              f"{_cell('value', best.value, metric)}"
              + (f", test {_cell(f'test_{metric}', results[f'test_{metric}'], metric)}"
                 if f"test_{metric}" in results else "")
              + f" (`{best.user_attrs.get('workdir', '')}`), overrides:", "",
              "```", json.dumps(best.user_attrs.get("overrides", best.params), indent=1),
              "```"]
  shown = [c for c in columns if c not in ("continues",) or any(r["continues"] != ""
                                                                   for r in table)]
  names = [c.removeprefix("param.") for c in shown]
  lines += ["", "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
  for row in table:
    lines.append("| " + " | ".join(_cell(c, row.get(c), metric) for c in shown) + " |")
  drawn = _plots(workdir, study)
  if drawn:
    lines += ["", " ".join(f"![{name}]({name}.png)" for name in drawn)]
  files.write_text_atomic(os.path.join(workdir, "results.md"), "\n".join(lines) + "\n")
  return lines


def _plots(workdir: str, study) -> list[str]:
  """Draws what the study has enough trials for; returns the names drawn."""
  from optuna.visualization import matplotlib as optuna_plots  # noqa: PLC0415

  plt = report_lib._pyplot()  # noqa: SLF001 (the file-only backend, chosen once)
  finished = [t for t in study.get_trials(deepcopy=False)
              if t.state.name in ("COMPLETE", "PRUNED")]
  drawn = []
  for name, function in PLOTS.items():
    if not finished or (name == "importances" and len(
        [t for t in finished if t.state.name == "COMPLETE"]) < 2):
      continue
    if name == "intermediate" and not any(t.intermediate_values for t in finished):
      continue
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
      try:
        axes = getattr(optuna_plots, function)(study)
      except (ValueError, RuntimeError):  # e.g. importances of a single-valued parameter
        continue
    figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
    figure.set_size_inches(max(figure.get_size_inches()[0], 7), 4.5)
    figure.tight_layout()
    report_lib._save_figure(figure, os.path.join(workdir, f"{name}.png"))  # noqa: SLF001
    drawn.append(name)
  plt.close("all")
  return drawn

"""How close each attention family gets to a pretrained encoder: after the swap, and after
distillation back toward the original.

For every family of ``configs/pretrained_swap.py``'s ``FAMILY_OPTIONS``, on the held-out
(test) sentences of the built-in corpus, padded to 64 tokens as in training:

* ``cos_swap``: mean cosine similarity of the swapped model's sentence embeddings to the
  original's (``effx.pretrained.load(attention=...)``, no training);
* ``cos_distilled``: the same for the best checkpoint of the family's run in the sweep;
* ``spearman_*``: Spearman rank correlation of all pairwise cosine similarities between
  the held-out sentences (the ranking a retrieval user sees) with the original's;
* ``steps``, ``train_s``: the run's training steps and wall time.

  python -m effx.sweep --config=configs/pretrained_swap.py --sweep=families \\
      --workdir=/tmp/swap_sweep
  python experiments/pretrained_swap.py --sweep=/tmp/swap_sweep \\
      --out=experiments/results/cpu/pretrained_swap

Writes ``results.csv``, ``results.md`` (the table) and ``swap.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "configs"))

import pretrained_swap  # noqa: E402  (configs/pretrained_swap.py)

from effx import pretrained  # noqa: E402
from effx.data import sentences  # noqa: E402


def ranks(x: np.ndarray) -> np.ndarray:
  out = np.empty(len(x))
  out[np.argsort(x, kind="stable")] = np.arange(len(x))
  return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman's rho of two score vectors (Pearson of their ranks; ties have measure 0
  for these real-valued similarities)."""
  return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def pairwise(e: np.ndarray) -> np.ndarray:
  e = e / np.linalg.norm(e, axis=-1, keepdims=True)
  sims = e @ e.T
  return sims[np.triu_indices(len(e), k=1)]


def compare(student: np.ndarray, teacher: np.ndarray) -> tuple[float, float]:
  cos = np.sum(student * teacher, -1) / (np.linalg.norm(student, axis=-1)
                                         * np.linalg.norm(teacher, axis=-1))
  return float(cos.mean()), spearman(pairwise(student), pairwise(teacher))


def apply(model, variables, tokens, batch=64):
  import jax  # noqa: PLC0415

  fn = jax.jit(lambda v, t: model.apply(v, t)[0])
  return np.concatenate([np.asarray(fn(variables, tokens[i:i + batch]))
                         for i in range(0, len(tokens), batch)])


def trial_dirs(sweep: str) -> dict[str, str]:
  """family -> the trial workdir of the sweep that ran it."""
  found = {}
  for name in sorted(os.listdir(sweep)) if os.path.isdir(sweep) else []:
    path = os.path.join(sweep, name, "config.json")
    if os.path.exists(path) and os.path.exists(os.path.join(sweep, name, "results.json")):
      with open(path, encoding="utf-8") as f:
        found[json.load(f)["model"]["attention"]] = os.path.join(sweep, name)
  return found


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sweep", required=True, help="the effx.sweep workdir")
  parser.add_argument("--out", required=True)
  parser.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2)")
  args = parser.parse_args()
  from effx.training.restore import restore  # noqa: PLC0415

  folder = args.model or pretrained.default_folder()
  task = sentences.load({"task": "sentences", "dir": None, "tokenizer": folder,
                         "max_len": pretrained_swap.MAX_LEN, "min_words": 6}, seed=0)
  test = task.splits["test"]
  tokens = np.stack([test[i]["inputs"] for i in range(len(test))])
  teacher = pretrained.load(folder, max_length=pretrained_swap.MAX_LEN)
  reference = apply(teacher.model, {"params": teacher.params}, tokens)
  trials = trial_dirs(args.sweep)
  rows = []
  for family, options in pretrained_swap.FAMILY_OPTIONS.items():
    swapped = pretrained.load(folder, family, options, max_length=pretrained_swap.MAX_LEN)
    cos_swap, rho_swap = compare(apply(swapped.model, {"params": swapped.params,
                                                       **swapped.state}, tokens), reference)
    row = {"family": family, "options": json.dumps(options, sort_keys=True),
           "own_parameters": "yes" if swapped.fresh else "no",
           "cos_swap": cos_swap, "spearman_swap": rho_swap}
    if family in trials:
      run, params, model_state, _ = restore(trials[family], "best")
      cos_d, rho_d = compare(apply(run.model, {"params": params, **model_state}, tokens),
                             reference)
      with open(os.path.join(trials[family], "results.json"), encoding="utf-8") as f:
        result = json.load(f)
      row.update(cos_distilled=cos_d, spearman_distilled=rho_d, steps=result["step"],
                 best_step=result["best_step"], train_s=result["wall_time_s"])
    elif family in pretrained_swap.EXACT:
      row.update(cos_distilled=cos_swap, spearman_distilled=rho_swap, steps=0, best_step=0,
                 train_s=0.0)
    rows.append(row)
    print(json.dumps(row))
  os.makedirs(args.out, exist_ok=True)
  fields = ["family", "options", "own_parameters", "cos_swap", "spearman_swap",
            "cos_distilled", "spearman_distilled", "steps", "best_step", "train_s"]
  with open(os.path.join(args.out, "results.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fields)
    writer.writeheader()
    writer.writerows(rows)
  lines = [f"Held-out sentences: {len(test)} (the built-in corpus' test split), "
           f"{len(test) * (len(test) - 1) // 2} pairs.", "",
           "| family | options | own params | cos swap | cos distilled | Spearman swap | "
           "Spearman distilled | steps (best) | train s |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in rows:
    def fmt(key, r=r):
      return f"{r[key]:.3f}" if key in r else "n/a"
    lines.append(f"| {r['family']} | `{r['options']}` | {r['own_parameters']} | "
                 f"{fmt('cos_swap')} | {fmt('cos_distilled')} | {fmt('spearman_swap')} | "
                 f"{fmt('spearman_distilled')} | {r.get('steps', 'n/a')} "
                 f"({r.get('best_step', 'n/a')}) | {r.get('train_s', float('nan')):.0f} |")
  with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  plot(rows, os.path.join(args.out, "swap.png"))


def plot(rows, path):
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  names = [r["family"] for r in rows]
  x = np.arange(len(rows))
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), sharex=True)
  for ax, key, title in ((axes[0], "cos", "cosine to the original's embeddings"),
                         (axes[1], "spearman", "Spearman of pairwise similarities")):
    ax.bar(x - 0.2, [r[f"{key}_swap"] for r in rows], 0.4, label="after the swap")
    ax.bar(x + 0.2, [r.get(f"{key}_distilled", np.nan) for r in rows], 0.4,
           label="after distillation")
    ax.set_title(title)
    ax.set_ylim(min(0.0, min(r[f"{key}_swap"] for r in rows)), 1.02)
    ax.set_xticks(x, names, rotation=60, ha="right")
    ax.grid(axis="y", alpha=0.3)
  axes[0].legend(loc="lower left")
  fig.suptitle("all-MiniLM-L6-v2 with its attention swapped (held-out sentences)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()

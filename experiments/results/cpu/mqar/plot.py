"""Test accuracy against key-value pairs, one line per attention family, from the sweep's
``results.csv`` beside this file; also prints the family x pairs table in markdown.

  python experiments/results/cpu/mqar/plot.py [RESULTS_CSV]

Two references are drawn: chance (1 / 31 values) and "no recall", the accuracy of a
model that answers each query with a value of the context not yet asked for, uniformly:
the i-th of n queries has n - i + 1 candidates left, so (1 + 1/2 + ... + 1/n) / n.
"""

import csv
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = pathlib.Path(__file__).parent
NUM_VALUES = 31  # vocab_size 64: ids 2..32 are keys, 33..63 values


def no_recall(pairs: int) -> float:
  return sum(1 / k for k in range(1, pairs + 1)) / pairs


def main(path: pathlib.Path) -> None:
  with open(path) as f:
    rows = [r for r in csv.DictReader(f) if r["status"] == "done"]
  acc = {(r["model.attention"], int(r["data.num_pairs"])): float(r["test_accuracy"])
         for r in rows}
  families = list(dict.fromkeys(f for f, _ in acc))
  pairs = sorted({p for _, p in acc})

  print("| family | " + " | ".join(f"{p} pairs" for p in pairs) + " |")
  print("|---|" + "---:|" * len(pairs))
  for family in families:
    cells = [f"{100 * acc[family, p]:.1f}" if (family, p) in acc else "" for p in pairs]
    print(f"| {family} | " + " | ".join(cells) + " |")
  print("| *no recall* | " + " | ".join(f"{100 * no_recall(p):.1f}" for p in pairs) + " |")

  fig, ax = plt.subplots(figsize=(8.5, 4.5))
  for family in families:
    xs = [p for p in pairs if (family, p) in acc]
    ax.plot(xs, [100 * acc[family, p] for p in xs], marker="o", label=family)
  ax.plot(pairs, [100 * no_recall(p) for p in pairs], "k--", label="no recall (reference)")
  ax.axhline(100 / NUM_VALUES, color="gray", linestyle=":", label="chance (1/31)")
  ax.set_xscale("log", base=2)
  ax.set_xticks(pairs, [str(p) for p in pairs])
  ax.set_xlabel("key-value pairs (length 64)")
  ax.set_ylabel("test accuracy over queries (%)")
  ax.set_ylim(0, 100)
  ax.set_title("MQAR, 2-layer width-64 causal LM, 1,000 steps, one seed")
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  fig.savefig(HERE / "accuracy_vs_pairs.png", dpi=120)


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results.csv")

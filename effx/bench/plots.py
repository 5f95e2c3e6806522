"""Log-log plots of a measurement against sequence length, one line per family, with
O(n) and O(n^2) guide slopes."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def lines_vs_length(rows, key: str, ylabel: str, title: str, path: str,
                    series: str = "family") -> None:
  """One line per value of ``row[series]`` (dense's in black)."""
  fig, ax = plt.subplots(figsize=(8, 5.5))
  families = list(dict.fromkeys(r[series] for r in rows))
  cmap = plt.get_cmap("tab20")
  anchor = None
  for i, family in enumerate(families):
    pts = sorted((r["length"], float(r[key])) for r in rows
                 if r[series] == family and r.get("status") == "ok" and r.get(key) not in
                 (None, ""))
    if not pts:
      continue
    xs, ys = zip(*pts)
    dense = family.split(" ")[0] == "dense"
    ax.plot(xs, ys, "-", marker="o", ms=3, lw=2.2 if dense else 1.2,
            color="black" if family in ("dense", "dense (cudnn)") else cmap(i % 20),
            label=family)
    if dense or anchor is None:
      anchor = (xs[0], ys[0])
  if anchor is not None:
    lengths = sorted({r["length"] for r in rows})
    x0, y0 = anchor
    for power, label in ((1, "O(n)"), (2, "O(n²)")):
      ax.plot(lengths, [y0 * (n / x0) ** power for n in lengths], ":", color="gray", lw=1)
      ax.annotate(label, (lengths[-1], y0 * (lengths[-1] / x0) ** power), fontsize=8,
                  color="gray")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("sequence length")
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.grid(True, which="both", alpha=0.2)
  if ax.get_legend_handles_labels()[0]:  # nothing measured: no legend
    ax.legend(fontsize=7, ncol=2, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)

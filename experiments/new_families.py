"""Tables and the learned-span picture of experiments/new_families.sh's runs.

  python experiments/new_families.py RUNS OUT
"""

import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

runs, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
results = lambda name: json.loads((runs / name / "results.json").read_text())  # noqa: E731

rows = ["| family | ListOps :small test | MQAR 2 pairs | 4 | 8 | 16 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |"]
for family in ("hierarchical", "adaptive_span"):
  cells = [f"{100 * results(f'listops_{family}')['test_accuracy']:.1f}%"]
  cells += [f"{100 * results(f'mqar_{family}_{p}')['test_accuracy']:.1f}%" for p in (2, 4, 8, 16)]
  rows.append(f"| {family} | " + " | ".join(cells) + " |")
lm = results("lm_adaptive_span")
rows += ["", "| byte LM (built-in corpus, segment 128, no memory) | validation bpb | test bpb |",
         "| --- | ---: | ---: |",
         f"| adaptive_span, max_span 128 | {lm['eval_bpb']:.3f} | {lm['test_bpb']:.3f} |"]

# The spans over training, one line per head, a panel per layer.
train = [json.loads(line) for line in (runs / "lm_adaptive_span" / "metrics.jsonl").open()]
train = [r for r in train if r["split"] == "train"]
names = sorted({k for r in train for k in r if k.startswith("span/")},
               key=lambda k: tuple(map(int, k.split("/")[1:])))
layers = sorted({int(k.split("/")[1]) for k in names})
fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 3.6), sharey=True)
for layer, ax in zip(layers, [axes] if len(layers) == 1 else axes):
  for name in (n for n in names if int(n.split("/")[1]) == layer):
    ax.plot([r["step"] for r in train], [r[name] for r in train],
            label=f"head {name.split('/')[2]}")
  ax.set(title=f"layer {layer}", xlabel="step")
  ax.grid(alpha=0.3)
(axes if len(layers) == 1 else axes[0]).set_ylabel("span (tokens)")
(axes if len(layers) == 1 else axes[-1]).legend(fontsize=8)
fig.suptitle("adaptive_span byte LM: learned span per head (max_span 128, ramp 32)")
fig.tight_layout()
fig.savefig(out / "spans.png", dpi=120)
final = train[-1]
rows += ["", "Learned spans at the last step (tokens; layer x head):", "",
         "| layer | " + " | ".join(f"head {h}" for h in range(len(names) // len(layers))) + " |",
         "| --- |" + " ---: |" * (len(names) // len(layers))]
for layer in layers:
  rows.append(f"| {layer} | " + " | ".join(f"{final[n]:.1f}" for n in names
                                         if int(n.split("/")[1]) == layer) + " |")
(out / "results.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))

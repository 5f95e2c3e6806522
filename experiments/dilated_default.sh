#!/usr/bin/env bash
# dilated at its default dilation (half the heads 1, the rest 2) on the two tasks its old
# default (2 on every head) could not learn: ListOps :small (1,000 steps, as in
# results/cpu/sweep_listops_families/) and MQAR at 2, 4, 8, 16 pairs (window 8, as in
# results/cpu/mqar/). Runs whose results.json exists are skipped.
#   bash experiments/dilated_default.sh /tmp/dilated experiments/results/cpu/dilated_default
set -euo pipefail
runs=${1:-/tmp/dilated}
out=${2:-experiments/results/cpu/dilated_default}
mkdir -p "$runs" "$out"
source "$(dirname "$0")/runs.sh"
train listops --config=configs/lra_listops.py:small --config.model.attention=dilated
for pairs in 2 4 8 16; do
  train "mqar_$pairs" --config=configs/mqar.py --config.model.attention=dilated \
      --config.model.attention_kwargs='{"window": 8}' --config.data.num_pairs=$pairs
done
python - "$runs" "$out" <<'PY'
import json, pathlib, sys
runs, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
rows = ["| run | test accuracy | validation accuracy | best step |", "| --- | --- | --- | --- |"]
for name in ["listops"] + [f"mqar_{p}" for p in (2, 4, 8, 16)]:
  r = json.loads((runs / name / "results.json").read_text())
  rows.append(f"| {name} | {100 * r['test_accuracy']:.1f}% | {100 * r['eval_accuracy']:.1f}% "
              f"| {r['best_step']} |")
(out / "results.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY

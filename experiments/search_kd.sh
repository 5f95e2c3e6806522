#!/usr/bin/env bash
# The distillation search of configs/distill_listops.py (search_kd: α, T, hidden and
# value-relation weights) for the 46% student of ListOps :small, 3,000 steps per trial
# with the median pruner, beside the hand-set students retrained with the same teacher.
#   bash experiments/search_kd.sh /tmp/kd experiments/results/cpu/search_kd [TRIALS]
set -euo pipefail
runs=${1:-/tmp/kd}
out=${2:-experiments/results/cpu/search_kd}
trials=${3:-10}
mkdir -p "$runs" "$out/runs"
# shellcheck source=experiments/runs.sh
. "$(dirname "$0")/runs.sh"
steps="--config.num_train_steps=3000"
train teacher --config=configs/lra_listops.py:small $steps
kd="--config=configs/distill_listops.py:small --config.distill.teacher_workdir=$runs/teacher"
# A Ctrl-C stops the search (rerunning continues it); the report covers what ended.
python -m effx.sweep $kd $steps --workdir="$runs/search" --search=kd --trials="$trials" \
    --pruner=median --pruner_startup_trials=3 --pruner_warmup_steps=1000 \
    > "$runs/search.log" 2>&1 || \
    python -m effx.sweep $kd --workdir="$runs/search" --search=kd --report >> "$runs/search.log"
# The hand-set students of ../compress_listops_3000/, with this teacher and this effx.
train student_kd $kd $steps
train student_kd_value_relation $kd $steps --config.distill.value_relation_weight=1.0
for file in results.md results.csv search.json history.png slice.png importances.png \
    intermediate.png; do
  [ -f "$runs/search/$file" ] && cp "$runs/search/$file" "$out/"
done
for run in teacher student_kd student_kd_value_relation; do
  cp "$runs/$run/results.json" "$out/runs/$run.results.json"
done
for trial in "$runs"/search/trial-*; do
  [ -f "$trial/results.json" ] && cp "$trial/results.json" "$out/runs/$(basename "$trial").results.json"
done
true

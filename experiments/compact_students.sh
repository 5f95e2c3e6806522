#!/usr/bin/env bash
# The compression recipe end to end on ListOps :small, one command per stage, then the
# size / latency / accuracy report: teacher -> distilled half-size student -> pruned
# (50% of its kernels, during distillation) -> int8 (post-training, and after
# quantization-aware training). Uses the teacher and students that
# experiments/compress_listops.sh leaves in the same RUNS folder (run it first, with the
# same STEPS). Runs and exports that exist are skipped.
#   bash experiments/compact_students.sh /tmp/compress experiments/results/cpu/compact_students [STEPS]
set -euo pipefail
runs=${1:-/tmp/compress}
out=${2:-experiments/results/cpu/compact_students}
steps=${3:-1000}
mkdir -p "$runs" "$out"
train() {
  name=$1; shift
  [ -f "$runs/$name/results.json" ] && return 0
  python -m effx.train --workdir="$runs/$name" --config.num_train_steps="$steps" "$@" \
      > "$runs/$name.log" 2>&1
}
quantize() {
  [ -d "$runs/$2" ] && return 0
  python -m effx.quantize --workdir="$runs/$1" --out="$runs/$2" >> "$runs/$2.log" 2>&1
}
kd="--config=configs/distill_listops.py:small --config.distill.teacher_workdir=$runs/teacher"
pruned="--config.prune.method=magnitude --config.prune.target_sparsity=0.5"
train student_kd_pruned $kd $pruned
train student_kd_pruned_qat $kd $pruned --config.quant.mode=qat
quantize teacher teacher_int8
quantize student_kd student_kd_int8
quantize student_kd_pruned student_kd_pruned_int8
quantize student_kd_pruned_qat student_kd_pruned_qat_int8
names=(teacher teacher_int8 student_alone student_kd student_kd_performer student_kd_int8
       student_kd_pruned student_kd_pruned_int8 student_kd_pruned_qat student_kd_pruned_qat_int8)
workdirs=$(printf "$runs/%s," "${names[@]}")
python -m effx.bench.students --workdirs="${workdirs%,}" --out="$out"
for name in "${names[@]}"; do
  for file in results.json quantization.json; do
    [ -f "$runs/$name/$file" ] && mkdir -p "$out/runs" && \
        cp "$runs/$name/$file" "$out/runs/$name.$file"
  done
done

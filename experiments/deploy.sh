#!/usr/bin/env bash
# Deployable students through every route (effx, StableHLO, ONNX Runtime fp32 / int8
# dynamic / int8 static), measured by the students report at 1 thread and all threads.
#   bash experiments/deploy.sh RUNS OUT
# RUNS holds, from earlier commands (README, "Compact students" and "Pretrained encoders"):
#   teacher, student_kd_pruned_qat, student_kd_pruned_qat_int8  (ListOps :small, 3,000
#       steps each; the student from configs/distill_listops.py:small with
#       --config.prune.method=magnitude --config.prune.target_sparsity=0.5
#       --config.quant.mode=qat, then python -m effx.quantize)
#   minilm_dense    (configs/pretrained_swap.py with dense attention, one step at learning
#       rate 0: all-MiniLM-L6-v2 as loaded, as a workdir)
#   minilm_bigbird  (configs/pretrained_swap.py with bigbird, FAMILY_OPTIONS' options)
# Artifacts that exist are kept.
set -euo pipefail
runs=${1:?RUNS}
out=${2:-experiments/results/cpu/deploy}
calls=${CALLS:-20}
mkdir -p "$out"
export_() {  # name workdir args...
  name=$1; workdir=$2; shift 2
  [ -d "$runs/art/$name" ] && return 0
  python -m effx.export --workdir="$workdir" --out="$runs/art/$name" "$@" 2>&1 \
      | grep -v '^[IW][0-9]' | tee -a "$out/exports.log"
}
mkdir -p "$runs/art"
routes() {  # prefix workdir onnx-batch
  export_ "$1_stablehlo" "$2"
  export_ "$1_ort_fp32" "$2" --format=onnx --batch="$3"
  export_ "$1_ort_int8_dynamic" "$2" --format=onnx --batch="$3" --int8=dynamic
  export_ "$1_ort_int8_static" "$2" --format=onnx --batch="$3" --int8=static \
      --calibration_examples=256
}
report() {  # folder workdirs artifacts
  python -m effx.bench.students --workdirs="$2" --artifacts="$3" --threads=1,all \
      --calls="$calls" --warmup=3 --out="$out/$1" | tail -n +1 > "$out/$1.log"
}
routes listops "$runs/student_kd_pruned_qat_int8" dynamic
a=$runs/art/listops
report listops "$runs/teacher,$runs/student_kd_pruned_qat,$runs/student_kd_pruned_qat_int8" \
    "${a}_stablehlo,${a}_ort_fp32,${a}_ort_int8_dynamic,${a}_ort_int8_static"
routes minilm_dense "$runs/minilm_dense" dynamic
# bigbird's ONNX graph holds operations jax2onnx lowers at static shapes only: batch 32.
routes minilm_bigbird "$runs/minilm_bigbird" 32
a=$runs/art/minilm_dense
b=$runs/art/minilm_bigbird
report minilm "$runs/minilm_dense,$runs/minilm_bigbird" \
    "${a}_stablehlo,${a}_ort_fp32,${a}_ort_int8_dynamic,${a}_ort_int8_static,${b}_stablehlo,${b}_ort_fp32,${b}_ort_int8_dynamic,${b}_ort_int8_static"

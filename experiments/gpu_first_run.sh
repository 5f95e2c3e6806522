#!/usr/bin/env bash
# effx on one GPU (an H100 or H200), in about 15 minutes: every backend against xla on the
# device, the attention benchmark in bfloat16 with cuDNN's dense as the reference line,
# then LRA ListOps at full size (configs/lra_listops.py) for dense and local in bfloat16.
# Each stage has a time cap; what finished is in $out.
#   pip install -e '.[test]' "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"
#   bash experiments/gpu_first_run.sh experiments/results/h100 [LISTOPS_STEPS]
set -uo pipefail
out=${1:-experiments/results/gpu}
steps=${2:-1500}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.csv"
timeout 180 python experiments/backend_check.py --out="$out/backend_check" \
    | tee "$out/backend_check.txt"
timeout 300 python -m effx.bench.attention \
    --families=dense,local,blockwise,dilated,sparse,longformer,bigbird,lsh,synthesizer \
    --backends=xla,cudnn,pallas --dtype=bfloat16 --lengths=1024,4096,16384,32768 \
    --mode=train --repeat=3 --timeout-s=60 --out="$out/attention_bf16"
for family in dense local; do
  timeout 240 python -m effx.train --config=configs/lra_listops.py \
      --workdir="/tmp/listops_$family" --config.model.attention=$family \
      --config.model.dtype=bfloat16 --config.num_train_steps="$steps" \
      --config.eval_every_steps=500 > "$out/listops_$family.log" 2>&1
  cp "/tmp/listops_$family/results.json" "$out/listops_${family}_results.json" || true
done

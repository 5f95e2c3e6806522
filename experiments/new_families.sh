#!/usr/bin/env bash
# The zoo's newest families (hierarchical, adaptive_span) on the existing small tasks:
# ListOps :small (1,000 steps, as results/cpu/sweep_listops_families/), MQAR at 2, 4, 8,
# 16 pairs (as results/cpu/mqar/), and an adaptive-span byte LM on the built-in corpus
# (configs/lm_enwik8.py:small without memory, as results/cpu/lm_memory/'s seq128_mem0)
# whose learned spans per layer and head are drawn. Runs whose results.json exists are
# skipped.
#   bash experiments/new_families.sh /tmp/new_families experiments/results/cpu/new_families
set -euo pipefail
runs=${1:-/tmp/new_families}
out=${2:-experiments/results/cpu/new_families}
mkdir -p "$runs" "$out"
source "$(dirname "$0")/runs.sh"
# MQAR is 64 tokens long: adaptive_span may learn to reach all of it.
declare -A MQAR_OPTIONS=([hierarchical]='{}' [adaptive_span]='{"max_span": 64}')
for family in hierarchical adaptive_span; do
  train "listops_$family" --config=configs/lra_listops.py:small \
      --config.model.attention=$family
  for pairs in 2 4 8 16; do
    train "mqar_${family}_$pairs" --config=configs/mqar.py --config.model.attention=$family \
        --config.model.attention_kwargs="${MQAR_OPTIONS[$family]}" --config.data.num_pairs=$pairs
  done
done
train lm_adaptive_span --config=configs/lm_enwik8.py:small --config.model.mem_len=0 \
    --config.model.attention=adaptive_span --config.model.attention_kwargs='{"max_span": 128}'
python experiments/new_families.py "$runs" "$out"

#!/usr/bin/env bash
# The compact-students table on ListOps :small: a teacher; students with 46% and 13% of
# its parameters trained alone and distilled (logits, + hidden states, + value relation,
# performer attention); the teacher pruned to 80% sparsity
# (magnitude, movement); the teacher with half its heads and MLP units removed, as
# exported and after fine-tuning. Runs whose results.json exists are skipped.
#   bash experiments/compress_listops.sh /tmp/compress experiments/results/cpu/compress_listops [STEPS]
set -euo pipefail
runs=${1:-/tmp/compress}
out=${2:-experiments/results/cpu/compress_listops}
steps=${3:-1000}
mkdir -p "$runs" "$out"
train() {
  name=$1; shift
  [ -f "$runs/$name/results.json" ] && return 0
  python -m effx.train --workdir="$runs/$name" --config.num_train_steps="$steps" "$@" \
      > "$runs/$name.log" 2>&1
}
half="--config.model.num_layers=1 --config.model.mlp_dim=64 --config.model.classifier_dim=64"
small="--config.model.num_layers=1 --config.model.emb_dim=32 --config.model.qkv_dim=32 \
--config.model.mlp_dim=32 --config.model.classifier_dim=32"
kd="--config=configs/distill_listops.py:small --config.distill.teacher_workdir=$runs/teacher"
train teacher --config=configs/lra_listops.py:small
train student_alone --config=configs/lra_listops.py:small $half
train student_kd $kd
train student_kd_hidden $kd --config.distill.hidden_weight=1.0
train student_kd_value_relation $kd --config.distill.value_relation_weight=1.0
train student_kd_performer $kd --config.model.attention=performer
train small_student_alone --config=configs/lra_listops.py:small $small
train small_student_kd $kd $small
train small_student_kd_value_relation $kd $small --config.distill.value_relation_weight=1.0
train teacher_pruned_80 --config=configs/lra_listops.py:small \
    --config.prune.method=magnitude --config.prune.target_sparsity=0.8
train teacher_movement_80 --config=configs/lra_listops.py:small \
    --config.prune.method=movement --config.prune.target_sparsity=0.8
if [ ! -d "$runs/teacher_heads" ]; then
  python -m effx.structured --workdir="$runs/teacher" --out="$runs/teacher_heads" --heads=2 \
      --mlp_units=64 > "$runs/teacher_heads.log" 2>&1
fi
for split in test validation; do
  ls "$runs"/teacher_heads/eval_${split}_best_*.json > /dev/null 2>&1 || \
      python -m effx.evaluate --workdir="$runs/teacher_heads" --checkpoint=best \
      --split=$split >> "$runs/teacher_heads.log" 2>&1
done
train teacher_heads_finetuned --config=configs/lra_listops.py:small --config.model.num_heads=2 \
    --config.model.qkv_dim=32 --config.model.mlp_dim=64 --config.model.classifier_dim=128 \
    --config.init_checkpoint="$runs/teacher_heads"
python - "$runs" "$out" "$steps" <<'PY'
import csv, glob, json, os, sys
runs, out, steps = sys.argv[1:]
teacher = json.load(open(os.path.join(runs, "teacher", "results.json")))
rows = []
def add(name, parameters, test, validation, best_step, trained, sparsity=0.0):
  rows.append({"run": name, "parameters": parameters,
               "params_vs_teacher": f"{parameters / teacher['num_parameters']:.2f}",
               "pruned_kernel_sparsity": f"{sparsity:.3f}", "test_accuracy": test,
               "validation_accuracy": validation, "best_step": best_step, "steps": trained,
               "test_vs_teacher": f"{test / teacher['test_accuracy']:.3f}"})
for name in ["teacher", "student_alone", "student_kd", "student_kd_hidden",
             "student_kd_value_relation", "student_kd_performer", "small_student_alone",
             "small_student_kd", "small_student_kd_value_relation", "teacher_pruned_80",
             "teacher_movement_80"]:
  r = json.load(open(os.path.join(runs, name, "results.json")))
  add(name, r["num_parameters"], r["test_accuracy"], r["eval_accuracy"], r["best_step"],
      r["step"], r.get("sparsity", {}).get("all", 0.0))
structure = json.load(open(os.path.join(runs, "teacher_heads", "structure.json")))
test, val = (json.load(open(glob.glob(os.path.join(runs, "teacher_heads",
                                                   f"eval_{split}_best_*.json"))[0]))
             for split in ("test", "validation"))
add("teacher_heads_exported", structure["parameters"][1], test["accuracy"], val["accuracy"],
    structure["step"], 0)
r = json.load(open(os.path.join(runs, "teacher_heads_finetuned", "results.json")))
add("teacher_heads_finetuned", r["num_parameters"], r["test_accuracy"], r["eval_accuracy"],
    r["best_step"], r["step"])
with open(os.path.join(out, "results.csv"), "w", newline="") as f:
  writer = csv.DictWriter(f, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
for row in rows:
  print(row)
PY

"""Distil a ListOps teacher into a smaller student (``effx.compress.distill``).

The teacher is a finished run of ``configs/lra_listops.py`` at the same size (the
student trains on the teacher's data, so the sizes must match):

  python -m effx.train --config=configs/lra_listops.py:small --workdir=/tmp/listops
  python -m effx.train --config=configs/distill_listops.py:small \\
      --config.distill.teacher_workdir=/tmp/listops --workdir=/tmp/listops_student

``:small``: the teacher's 2 layers -> 1 layer of the same width with half the MLP and
classifier hidden units (45% of the teacher's parameters); loss ``T² KL`` on the logits
(T = 2) plus 0.1 of the labels' cross-entropy. With
``--config.distill.init_from_teacher=True`` and equal widths (``--config.model.mlp_dim=128
--config.model.classifier_dim=128``) the student starts from the teacher's embeddings,
head and last layer. Add ``--config.distill.hidden_weight=1`` for the
hidden-state loss, ``--config.distill.attention_weight=1`` for attention-output transfer
(e.g. with ``--config.model.attention=performer``). ``:tiny`` (a smoke test): a
narrower student of the ``:tiny`` teacher, not initialised from it.
"""

import os

import ml_collections

from effx import cli


def get_config(size="small"):
  if size not in ("small", "tiny"):
    raise ValueError(f"configs/distill_listops.py:{size}: sizes are small and tiny (the "
                     "teacher must be a configs/lra_listops.py run of the same size)")
  here = os.path.dirname(os.path.abspath(__file__))
  c = cli.load_config(f"{os.path.join(here, 'lra_listops.py')}:{size}")
  c.distill.update(temperature=2.0, kd_weight=1.0, ce_weight=0.1)
  with c.distill.ignore_type():
    # Required: --config.distill.teacher_workdir=<the teacher's workdir>.
    c.distill.teacher_workdir = ml_collections.config_dict.placeholder(str)
  if size == "small":  # 39K parameters, 45% of the teacher's 86K
    c.model.update(num_layers=1, mlp_dim=64)
    c.model.classifier_dim = 64
  else:
    c.model.update(qkv_dim=16, mlp_dim=32)
    c.model.classifier_dim = 32
  return c


def search_kd(trial, arg=None):
  """The distillation's weights and temperature (``--search=kd``): α ∈ [0, 1] splits the
  output loss between the teacher's softened logits (α) and the labels (1 - α), as in
  the Hugging Face compression chapter; T ∈ [1, 20]; the hidden-state and MiniLM
  value-relation weights ∈ [0, 2] (0 = off)."""
  del arg
  alpha = trial.suggest_float("alpha", 0.0, 1.0)
  return {
      "distill.kd_weight": alpha,
      "distill.ce_weight": 1.0 - alpha,
      "distill.temperature": trial.suggest_float("temperature", 1.0, 20.0),
      "distill.hidden_weight": trial.suggest_float("hidden_weight", 0.0, 2.0),
      "distill.value_relation_weight": trial.suggest_float("value_relation_weight", 0.0, 2.0),
  }


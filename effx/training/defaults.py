"""The base of every training config: each top-level key with its default and meaning.

``configs/lra_<task>.py`` start from ``base(task)`` and set the LRA values; ``resize``
is the ``:tiny`` / ``:small`` switch. ``effx.training.validate.config`` rejects any key not
listed here.
"""

from __future__ import annotations

import json
import os

import ml_collections

from effx import data as data_lib
from effx.common import files
from effx.compress import distill, prune, quant
from effx.models.config import DEFAULTS as MODEL_DEFAULTS

SIZES = ("full", "small", "tiny")
# Model keys the task decides; a config may repeat them only with the task's value.
TASK_MODEL_KEYS = ("vocab_size", "num_classes", "max_len")

# Logical axis -> mesh axis (None: replicated). Parameters shard their heads and MLP
# hidden units over "model"; activations shard the batch over "data".
DEFAULT_RULES = (("batch", "data"), ("length", None), ("embed", None), ("heads", "model"),
                 ("kv", None), ("mlp", "model"), ("vocab", None), ("layers", None))


def base(task: str) -> ml_collections.ConfigDict:
  """Every top-level key, with defaults; ``model`` and ``data`` filled for ``task``."""
  c = ml_collections.ConfigDict()
  c.seed = 0                      # params, dropout and data order all derive from it
  c.batch_size = 32               # global batch, split over the mesh's data axis
  c.num_train_steps = 5000
  c.eval_every_steps = 500        # validation (and best-checkpoint tracking) cadence
  c.checkpoint_every_steps = 500  # also on SIGTERM and at the end
  c.keep_checkpoints = 3          # newest K kept in workdir/checkpoints
  c.log_every_steps = 50
  c.max_eval_examples = 0         # periodic validation on the first N (0: all of it)
  c.max_test_examples = 0         # final test on the first N (0: the whole test split)
  c.learning_rate = 0.05          # peak
  c.warmup_steps = 1000           # linear warm-up to the peak
  c.schedule = "rsqrt"            # after warm-up: "rsqrt", "cosine" or "constant"
  c.weight_decay = 0.1            # AdamW, decoupled; on matrices only
  c.adam_b1 = 0.9
  c.adam_b2 = 0.98
  c.grad_clip_norm = 0.0          # 0: no clipping
  c.grad_accum_steps = 1          # micro-batches per step (batch_size must divide)
  c.init_checkpoint = ""          # params to start from when workdir has no checkpoint
  c.data_threads = 2              # grain reader threads per host
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))  # -1: all remaining devices
  c.sharding_rules = DEFAULT_RULES
  # The model's defaults are ModelConfig's (what a library user gets too), less the keys
  # the task decides (vocab_size, num_classes, max_len: effx.training.validate.model).
  model = {k: v for k, v in MODEL_DEFAULTS.items() if k not in TASK_MODEL_KEYS}
  model.update(kind=data_lib.model_kind(task), pool="mean" if task == "sentences" else "cls")
  c.model = ml_collections.ConfigDict({k: v for k, v in model.items() if v is not None})
  for key, value in model.items():
    if value is None:  # an optional int (None: off); placeholders keep the type checked
      c.model[key] = ml_collections.config_dict.placeholder(int)
  c.data = ml_collections.ConfigDict(data_lib.defaults(task))
  # Distillation from a finished run (effx.compress.distill); teacher_workdir "" keeps it off.
  c.distill = distill.defaults()
  # Magnitude pruning during training (effx.compress.prune); method "none" keeps it off.
  c.prune = prune.defaults()
  # Quantization-aware training or an integer export (effx.compress.quant); mode "none" keeps it off.
  c.quant = quant.defaults()
  return c


def resize(c: ml_collections.ConfigDict, size: str | None) -> ml_collections.ConfigDict:
  """``"full"`` (unchanged), ``"small"`` (a few minutes on a 2-core CPU) or ``"tiny"``
  (about a minute: a smoke test of the whole loop, not of the task)."""
  size = size or "full"
  if size not in SIZES:
    raise ValueError(f"config size {size!r} is not one of {', '.join(SIZES)} "
                     "(use configs/lra_<task>.py:small)")
  if size == "full":
    return c
  small = size == "small"
  c.model.update(num_layers=2 if small else 1, emb_dim=64 if small else 32,
                 qkv_dim=64 if small else 32, num_heads=4 if small else 2,
                 mlp_dim=128 if small else 64)
  c.batch_size = 32 if small else 8
  c.num_train_steps = 2000 if small else 40
  c.warmup_steps = min(c.warmup_steps, 200 if small else 10)
  c.eval_every_steps = 500 if small else 20
  c.checkpoint_every_steps = 500 if small else 20
  c.log_every_steps = 100 if small else 10
  c.max_eval_examples = 1000 if small else 64
  c.max_test_examples = 0 if small else 64
  c.data_threads = 2
  return c


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in ``workdir`` was started with."""
  path = os.path.join(workdir, "config.json")
  if not files.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} an effx.train workdir?")
  values = json.loads(files.read_text(path))
  values["sharding_rules"] = tuple(tuple(r) for r in values["sharding_rules"])
  config = ml_collections.ConfigDict(values)
  # Sections added to effx after the run was made take their defaults (they were off).
  fresh = base(config.data.task)
  with config.unlocked():
    for section in ("distill", "prune", "quant"):
      if section not in config:
        config[section] = fresh[section]
  return config

"""Every check of a training config, in one place, before anything is loaded or compiled.

``config(c)`` checks the top-level keys, then each section: ``data`` (its keys and types,
then the chosen source's own rule in the task module), ``model`` (through
``models.model_config``, whose dataclasses also check the values when the library builds a
model without a config), ``distill``, ``prune`` and ``quant`` (each by its own module's
``check`` in ``effx.compress``), and the ``mesh`` against the devices and the batch.
Unknown keys and wrong types follow one rule everywhere
(``effx.common.schema.check_section``). Checks that need loaded data or a teacher (a
task's vocabulary, a teacher's layers: ``distill.check_pair``) happen when those are
loaded.
"""

from __future__ import annotations

import jax
import ml_collections

from effx import data as data_lib
from effx import models
from effx.common import schema
from effx.compress import distill as distill_lib
from effx.compress import prune as prune_lib
from effx.compress import quant as quant_lib
from effx.training import defaults, optim, sharding

# Sections with their own check below (the rest of the top level are scalars).
SECTIONS = ("model", "data", "mesh", "sharding_rules", "distill", "prune", "quant")
POSITIVE = ("batch_size", "num_train_steps", "eval_every_steps", "checkpoint_every_steps",
            "keep_checkpoints", "log_every_steps", "grad_accum_steps", "data_threads")
NON_NEGATIVE = ("warmup_steps", "max_eval_examples", "max_test_examples")


def config(c: ml_collections.ConfigDict, device_count: int | None = None) -> None:
  """Unknown keys, wrong types and impossible combinations of a training config raise,
  naming the key; the mesh is checked against ``device_count`` devices (default: this
  machine's)."""
  if "data" not in c or "task" not in c.data:
    raise ValueError(f"config.data.task is missing (one of: {', '.join(data_lib.TASKS)})")
  data_lib.check_task(c.data.task)
  base = defaults.base(c.data.task)
  unknown = sorted(set(c.keys()) - set(base.keys()))
  if unknown:
    raise ValueError(f"unknown config key(s): {', '.join('config.' + k for k in unknown)}; "
                     f"valid keys: {', '.join(base.keys())}")
  scalars = {k: v for k, v in base.items() if k not in SECTIONS}
  schema.check_section("config", {k: c[k] for k in scalars if k in c}, scalars)
  for key in POSITIVE:
    if key in c and c[key] <= 0:
      raise ValueError(f"config.{key}={c[key]} must be positive")
  for key in NON_NEGATIVE:
    if key in c and c[key] < 0:
      raise ValueError(f"config.{key}={c[key]} must be >= 0")
  if c.batch_size % c.grad_accum_steps:
    raise ValueError(f"config.batch_size={c.batch_size} is not divisible by "
                     f"config.grad_accum_steps={c.grad_accum_steps}")
  optim.schedule(c)  # validates config.schedule
  data_lib.check_config(c.data)
  prune_lib.check(c.prune, c.num_train_steps)
  expected_kind = data_lib.model_kind(c.data.task)
  if c.model.get("kind", expected_kind) != expected_kind:
    raise ValueError(f"model.kind={c.model.kind!r} does not fit data.task="
                     f"{c.data.task!r}, which needs model.kind={expected_kind!r}")
  if expected_kind == "causal_lm":
    language_model(c)
  distill_lib.check(c.distill, kind=expected_kind, task=c.data.task,
                    init_checkpoint=c.get("init_checkpoint", ""))
  quant_lib.check(c.quant)
  quant_lib.check_model(c.quant, model(c))
  mesh = sharding.mesh_shape(c.mesh, device_count or jax.device_count())
  if c.batch_size % mesh[0]:
    raise ValueError(f"config.batch_size={c.batch_size} is not divisible by the mesh's "
                     f"data axis ({mesh[0]} devices; config.mesh.data={c.mesh.data})")
  if c.model.num_heads % mesh[1] or c.model.mlp_dim % mesh[1]:
    raise ValueError(f"config.mesh.model={mesh[1]} must divide model.num_heads="
                     f"{c.model.num_heads} and model.mlp_dim={c.model.mlp_dim}")
  if (c.batch_size // c.grad_accum_steps) % mesh[0]:
    raise ValueError("config.batch_size / config.grad_accum_steps must be divisible by "
                     f"the mesh's data axis ({mesh[0]})")


def language_model(c: ml_collections.ConfigDict) -> None:
  """What a causal LM's training does not support yet, named."""
  memory = c.model.get("mem_len", 0) or c.model.get("compressed_len", 0)
  if memory and c.grad_accum_steps > 1:
    raise ValueError(f"config.grad_accum_steps={c.grad_accum_steps} with segment memory "
                     "(model.mem_len > 0): each row's memory follows its stream from step "
                     "to step, which micro-batches would split; use grad_accum_steps=1")


def model(c: ml_collections.ConfigDict, task: data_lib.TaskData | None = None
          ) -> models.ModelConfig:
  """``config.model`` validated (every key, type and combination), with the task's
  ``vocab_size``, ``num_classes`` and ``max_len`` filled in when ``task`` is given; a
  config that sets one of those to another value raises. (A sentence encoder may keep
  its own ``max_len``, its position table, which must cover the task's.)"""
  values = c.model.to_dict()
  if task is not None:
    if task.kind == "embedding" and values.get("max_len", task.max_len) < task.max_len:
      raise ValueError(f"data.max_len={task.max_len} exceeds model.max_len="
                       f"{values['max_len']} (the encoder's position table)")
    for key in defaults.TASK_MODEL_KEYS:
      if key == "num_classes" and task.kind in ("lm", "embedding"):
        continue  # a language model predicts its vocabulary; an encoder has no classes
      if key == "max_len" and task.kind == "embedding" and "max_len" in values:
        continue
      value = getattr(task, key)
      if key in values and values[key] != value:
        raise ValueError(f"model.{key}={values[key]} contradicts data.task="
                         f"{c.data.task!r}, which has {key}={value}; drop the key")
      values[key] = value
  return models.model_config(values)



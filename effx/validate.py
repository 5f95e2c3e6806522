"""Every check of a training config, in one place, before anything is loaded or compiled.

``config(c)`` checks the top-level keys, then each section: ``data`` (its keys and types,
then the chosen source's own rule in the task module), ``model`` (through
``models.model_config``, whose dataclasses also check the values when the library builds a
model without a config), ``distill``, ``prune``, ``quant`` (with the model it applies to)
and the ``mesh`` against the devices and the batch. Unknown keys and wrong types
follow one rule everywhere (``effx.cli.check_section``). Checks that need loaded data or a
teacher (a task's vocabulary, a teacher's layers) happen when those are loaded.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import ml_collections

from effx import cli
from effx import data as data_lib
from effx import defaults, distill as distill_lib, models, optim, prune as prune_lib
from effx import quant as quant_lib, sharding
from effx import workdir as workdir_lib

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
  cli.check_section("config", {k: c[k] for k in scalars if k in c}, scalars)
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
  distill(c.distill)
  prune(c.prune, c.num_train_steps)
  expected_kind = data_lib.model_kind(c.data.task)
  if c.model.get("kind", expected_kind) != expected_kind:
    raise ValueError(f"model.kind={c.model.kind!r} does not fit data.task="
                     f"{c.data.task!r}, which needs model.kind={expected_kind!r}")
  if expected_kind == "causal_lm":
    language_model(c)
  if expected_kind == "encoder" and not (c.distill.get("teacher_workdir")
                                         or c.distill.get("teacher_model")):
    raise ValueError(f"data.task={c.data.task!r} has no labels: it trains a sentence encoder "
                     "toward a teacher; set distill.teacher_model (a pretrained model "
                     "folder) or distill.teacher_workdir")
  if expected_kind == "encoder":
    if c.distill.kd_weight or c.distill.ce_weight:
      raise ValueError(f"distill.kd_weight={c.distill.kd_weight} / ce_weight="
                       f"{c.distill.ce_weight}: a sentence encoder has neither logits nor "
                       "labels; set both to 0 and use distill.embedding_weight (and hidden / "
                       "attention / value-relation losses)")
    weights = ("embedding_weight", "hidden_weight", "attention_weight",
               "value_relation_weight", "attention_kl_weight")
    if not any(c.distill[k] for k in weights):
      raise ValueError(f"every loss weight of the sentence encoder is 0: set at least one "
                       f"of {', '.join('distill.' + k for k in weights)}")
  quant(c.quant)
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
  teacher = c.distill.get("teacher_workdir") or c.distill.get("teacher_model")
  if teacher:
    raise ValueError(f"distill teacher {teacher!r}: distillation of a language model "
                     f"(data.task={c.data.task!r}) is not supported; unset it")


# Model keys the task decides; a config may repeat them only with the task's value.
TASK_MODEL_KEYS = ("vocab_size", "num_classes", "max_len")


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
    for key in TASK_MODEL_KEYS:
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


def distill(section: Mapping[str, Any]) -> None:
  """``config.distill``: keys, types, and values that cannot work (``effx.distill``)."""
  values = dict(section)
  for key, what in (("teacher_workdir", "the workdir of a finished effx.train run"),
                    ("teacher_model", "a pretrained model folder")):
    if values.get(key, "") is None:
      raise ValueError(f"distill.{key} is not set: pass --config.distill.{key}=<{what}>")
  cli.check_section("distill", values, distill_lib.DEFAULTS)
  if values.get("teacher_workdir") and values.get("teacher_model"):
    raise ValueError(f"distill.teacher_workdir={values['teacher_workdir']!r} and "
                     f"distill.teacher_model={values['teacher_model']!r} both name a "
                     "teacher; set one")
  for key in ("kd_weight", "ce_weight", "embedding_weight", "hidden_weight",
              "attention_weight", "value_relation_weight", "attention_kl_weight",
              "relation_heads"):
    if values.get(key, 0.0) < 0:
      raise ValueError(f"distill.{key}={values[key]} must be >= 0")
  if values.get("temperature", 1.0) <= 0:
    raise ValueError(f"distill.temperature={values['temperature']} must be positive")
  if values.get("hidden_loss", "mse") not in distill_lib.HIDDEN_LOSSES:
    raise ValueError(f"distill.hidden_loss={values['hidden_loss']!r}; one of "
                     f"{', '.join(distill_lib.HIDDEN_LOSSES)}")
  if not (values.get("teacher_workdir") or values.get("teacher_model")):
    changed = [k for k, default in distill_lib.DEFAULTS.items()
               if k not in ("teacher_workdir", "teacher_model")
               and workdir_lib.normalise(values.get(k, default))
               != workdir_lib.normalise(default)]
    if changed:
      raise ValueError(f"{', '.join('distill.' + k for k in changed)} set but no teacher: set "
                       "distill.teacher_workdir (a finished run) or distill.teacher_model (a "
                       "pretrained model folder), or leave the distill section at its "
                       "defaults")


def prune(section: Mapping[str, Any], num_train_steps: int) -> None:
  """``config.prune``: keys, types, and values that cannot work (``effx.prune``)."""
  cli.check_section("prune", section, prune_lib.DEFAULTS)
  values = {**prune_lib.DEFAULTS, **dict(section)}
  for key, choices in (("method", prune_lib.METHODS), ("scope", prune_lib.SCOPES)):
    if values[key] not in choices:
      raise ValueError(f"prune.{key}={values[key]!r}; one of {', '.join(choices)}")
  for key in ("target_sparsity", "initial_sparsity"):
    if not 0.0 <= values[key] < 1.0:
      raise ValueError(f"prune.{key}={values[key]} must be in [0, 1)")
  _regexes("prune", values, ("include", "exclude"))
  if values["update_every"] <= 0:
    raise ValueError(f"prune.update_every={values['update_every']} must be positive")
  if values["method"] != "none":
    start, end = prune_lib.window(values, num_train_steps)
    if not 0 <= start < end <= num_train_steps:
      raise ValueError(f"prune.start_step={start} and end_step={end} must satisfy "
                       f"0 <= start_step < end_step <= num_train_steps={num_train_steps}")


def quant(section: Mapping[str, Any]) -> None:
  """``config.quant``: keys, types, and values that cannot work (``effx.quant``)."""
  cli.check_section("quant", section, quant_lib.DEFAULTS)
  values = {**quant_lib.DEFAULTS, **dict(section)}
  if values["mode"] not in quant_lib.MODES:
    raise ValueError(f"quant.mode={values['mode']!r}; one of {', '.join(quant_lib.MODES)}")
  if values["weight_qtype"] not in quant_lib.WEIGHT_QTYPES:
    raise ValueError(f"quant.weight_qtype={values['weight_qtype']!r}; one of "
                     f"{', '.join(quant_lib.WEIGHT_QTYPES)}")
  if values["act_qtype"] == "int4":
    raise ValueError("quant.act_qtype='int4': 4-bit activations are not supported (w4a4 "
                     "does not compile on XLA:CPU); use act_qtype='int8' or 'none' "
                     "(weight-only)")
  if values["act_qtype"] not in quant_lib.ACT_QTYPES:
    raise ValueError(f"quant.act_qtype={values['act_qtype']!r}; one of "
                     f"{', '.join(quant_lib.ACT_QTYPES)}")
  if values["tile_size"] < 0:
    raise ValueError(f"quant.tile_size={values['tile_size']} must be >= 0 (0: per channel)")
  _regexes("quant", values, ("include", "exclude"))
  if values["mode"] == "none":
    changed = [k for k, default in quant_lib.DEFAULTS.items() if values[k] != default]
    if changed:
      raise ValueError(f"{', '.join('quant.' + k for k in changed)} set but quant.mode is "
                       "'none': set quant.mode='qat' (or export with effx.quantize), or "
                       "leave the quant section at its defaults")


def _regexes(section: str, values: Mapping[str, Any], keys) -> None:
  for key in keys:
    try:
      re.compile(values[key])
    except re.error as error:
      raise ValueError(f"{section}.{key}={values[key]!r} is not a regular expression: "
                       f"{error}") from None



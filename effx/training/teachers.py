"""The teacher of a distillation run: a finished ``effx.train`` workdir or a pretrained
model folder, loaded, checked against the student and recorded in the student's workdir.

``workdir/teacher.json`` records the teacher's path, step and a SHA-256 of its
parameters; a resumed run refuses a teacher whose parameters changed. The losses are
``effx.compress.distill``'s.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effx import compress, models, pretrained
from effx.compress import distill
from effx.training import checkpoint as ckpt
from effx.training import defaults, objectives, validate
from effx.training import workdir as workdir_lib


def params_sha256(params) -> str:
  """SHA-256 of every parameter's path, shape, dtype and bytes (host order)."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
    array = np.asarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{array.shape}:{array.dtype}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


class Teacher:
  """A finished run's model and best parameters.

  Attributes:
    model: the teacher's Linen model.
    variables: ``{"params": ..., "model_state": ...}`` (host arrays until placed).
    config: the teacher run's config.
    step: the step of its best checkpoint.
    sha256: ``params_sha256`` of its parameters.
  """

  def __init__(self, workdir: str, student_data: dict[str, Any], task,
               student_model_config):
    where = f"distill.teacher_workdir={workdir!r}"
    if not os.path.isdir(workdir):
      raise FileNotFoundError(f"{where}: no such folder (the workdir of a finished "
                              "effx.train run)")
    try:
      config = defaults.load_workdir_config(workdir)
    except (OSError, ValueError, KeyError) as error:
      raise ValueError(f"{where}: not an effx.train workdir ({error})") from None
    task_name = student_data["task"]
    if config.data.task != task_name:
      raise ValueError(f"{where} was trained on data.task={config.data.task!r}; the student's "
                       f"task is {task_name!r}")
    other = {k: (config.data.get(k), v) for k, v in student_data.items()
             if k != "cache_dir"
             and workdir_lib.normalise(config.data.get(k)) != workdir_lib.normalise(v)}
    if other:
      raise ValueError(f"{where} was trained on other data: " + ", ".join(
          f"data.{k}={t!r} (student: {s!r})" for k, (t, s) in other.items()) +
          "; distil on the teacher's data")
    teacher_model_config = validate.model(config, task)
    for key in ("vocab_size", "num_classes", "kind"):
      a, b = getattr(teacher_model_config, key), getattr(student_model_config, key)
      if a != b:
        raise ValueError(f"{where}: the teacher has model.{key}={a!r}, the student {b!r}")
    self.config, self.model_config = config, teacher_model_config
    self.model = models.build(teacher_model_config)
    for part in compress.parts(config):
      self.model = part.wrap_model(self.model)
    dummy = jnp.zeros((1, task.max_len), jnp.int32)
    dummies = (dummy, dummy) if task.dual else (dummy,)
    shapes = jax.eval_shape(
        lambda: self.model.init({"params": jax.random.PRNGKey(0),
                                 "dropout": jax.random.PRNGKey(0)}, *dummies, train=False))
    shapes = nn.unbox(shapes)
    target = {"params": shapes["params"],
              "model_state": {k: v for k, v in shapes.items() if k != "params"}}
    checkpoints = ckpt.Checkpoints(workdir, keep=1)
    try:
      step = checkpoints.best.latest_step()
      if step is None:
        raise FileNotFoundError(f"{where}: no best checkpoint in {workdir}/best (has the "
                                "run finished a validation?)")
      try:
        restored = checkpoints.restore_best(target, step)
      except Exception as error:  # orbax raises many types for an unreadable folder
        raise ValueError(f"{where}: best checkpoint {step} does not restore "
                         f"({type(error).__name__}: {str(error)[:300]})") from None
    finally:
      checkpoints.close()
    self.variables = {"params": restored["params"], "model_state": restored["model_state"]}
    self.step = step
    self.sha256 = params_sha256(self.variables["params"])
    self.workdir = os.path.abspath(workdir)

  def record(self, workdir: str) -> None:
    """Writes ``workdir/teacher.json``; on a resume, refuses a teacher that changed."""
    path = os.path.join(workdir, "teacher.json")
    mine = {"workdir": self.workdir, "best_step": self.step, "params_sha256": self.sha256}
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        stored = json.load(f)
      if stored["params_sha256"] != self.sha256:
        raise workdir_lib.ConfigMismatchError(self._changed(stored))
    if jax.process_index() == 0:
      workdir_lib.write_json_atomic(path, mine)

  def _changed(self, stored: dict) -> str:
    return (f"the teacher in {self.workdir} (best step {self.step}) is not the one this run "
            f"was distilled from (best step {stored['best_step']}, parameters "
            f"{stored['params_sha256'][:12]}..., now {self.sha256[:12]}...); use another "
            "--workdir for the new teacher")


class PretrainedTeacher(Teacher):
  """A pretrained model folder as the teacher (``effx.pretrained``, dense attention), with
  ``Teacher``'s attributes; ``step`` is 0 and ``workdir`` is the folder."""

  def __init__(self, folder: str, student_model_config):  # pylint: disable=super-init-not-called
    where = f"distill.teacher_model={folder!r}"
    try:
      loaded = pretrained.load(folder)
    except pretrained.PretrainedError as error:
      raise pretrained.PretrainedError(f"{where}: {error}") from None
    if student_model_config.kind != "encoder":
      raise ValueError(f"{where} is a sentence encoder; the student must be one too "
                       f"(model.kind='encoder', data.task='sentences'), not "
                       f"{student_model_config.kind!r}")
    if student_model_config.vocab_size != loaded.config.vocab_size:
      raise ValueError(f"{where} has vocab_size {loaded.config.vocab_size}, the student "
                       f"{student_model_config.vocab_size}: tokenize the data with the "
                       "teacher's tokenizer (data.tokenizer)")
    self.config, self.model_config, self.model = None, loaded.config, loaded.model
    self.variables = {"params": loaded.params, "model_state": loaded.state}
    self.step = 0
    self.sha256 = params_sha256(self.variables["params"])
    self.workdir = os.path.abspath(loaded.folder)
    self.tokenizer_file = os.path.join(self.workdir, "tokenizer.json")

  def _changed(self, stored: dict) -> str:
    return (f"the model in {self.workdir} (parameters {self.sha256[:12]}...) is not the "
            f"teacher this run was distilled from ({stored['workdir']}, parameters "
            f"{stored['params_sha256'][:12]}...); use another --workdir for the new teacher")


def _same_tokenizer(data: dict, teacher: PretrainedTeacher) -> None:
  """The sentences task must be tokenized as the teacher tokenizes."""
  folder = data.get("tokenizer") or pretrained.default_folder()
  mine = os.path.join(os.path.expanduser(folder), "tokenizer.json")
  with open(mine, "rb") as a, open(teacher.tokenizer_file, "rb") as b:
    if a.read() != b.read():
      raise ValueError(f"data.tokenizer={folder!r} is not the teacher's tokenizer "
                       f"({teacher.tokenizer_file}); tokenize with the teacher's folder")


def setup(config, task, student_model_config, student_model):
  """``(objective, teacher)`` when ``config.distill`` names a teacher, else ``(None,
  None)``: the teacher loaded, checked against the student (``distill.check_pair``), and
  the ``Distillation`` objective of the student toward it."""
  options = config.distill
  if options.teacher_model:
    teacher = PretrainedTeacher(os.path.expanduser(options.teacher_model),
                                student_model_config)
    if config.data.task == "sentences":
      _same_tokenizer(config.data.to_dict(), teacher)
  elif options.teacher_workdir:
    teacher = Teacher(os.path.expanduser(options.teacher_workdir), config.data.to_dict(),
                      task, student_model_config)
  else:
    return None, None
  layer_map, relation_heads = distill.check_pair(options, student_model_config,
                                                 teacher.model_config)
  losses = distill.Losses(options, layer_map, relation_heads,
                          embedding=student_model_config.kind == "encoder")
  return objectives.Distillation(student_model, teacher.model, losses), teacher

"""``Run``: a config's model, sharded state, objective and compiled steps.

Built by the training loop, by evaluation of a finished run (``restore``) and by
ahead-of-time compilation (``aot``): each sees the same model, shardings, objective and
step functions for a config.
"""

from __future__ import annotations

import contextlib
import functools
import resource

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from effx import compress, models
from effx.attention import kernel
from effx import data as data_lib
from effx.data import pipeline
from effx.layers import memory as layer_memory
from effx.training import checkpoint as ckpt
from effx.training import objectives, optim, sharding, steps, teachers, validate


def peak_memory_bytes() -> int:
  """Peak device bytes in use on an accelerator, else the process's peak RSS."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Run:
  """A model, its sharded state and compiled steps for one config (training or eval)."""

  def __init__(self, config: ml_collections.ConfigDict, *, evaluation_only: bool = False,
               devices=None, task: data_lib.TaskData | None = None,
               teacher: bool | None = None):
    """``evaluation_only``: no training extras (a distillation teacher is not loaded,
    except that a sentence encoder is evaluated against its teacher). ``devices``: the
    mesh's devices (default: all of this process's job's); ``task``: the task's data or
    only its sizes (``data.describe``), instead of loading it; ``teacher``: whether to
    load the distillation teacher (None: as ``evaluation_only`` says; ahead-of-time
    compilation passes False, compiling the step without it)."""
    validate.config(config, None if devices is None else len(devices))
    self.config = config
    self.task = task if task is not None else data_lib.load(config.data, config.seed)
    self.model_config = validate.model(config, self.task)
    built = models.build(self.model_config)
    # The compression methods the config turns on (quantization, pruning), asked below
    # what they change, and by the loop what they report.
    self.parts = compress.parts(config)
    self.model = built
    for part in self.parts:
      self.model = part.wrap_model(self.model)
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = sharding.rules(config)
    self.tx = optim.optimizer(config)
    for part in self.parts:
      self.tx = part.wrap_optimizer(self.tx)
    trains = not any(part.training_error for part in self.parts)
    self.schedule = optim.schedule(config)
    root = jax.random.PRNGKey(config.seed)
    self.init_key, self.dropout_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)

    data_size = self.mesh.shape["data"]
    dummy = jnp.zeros((data_size, self.task.max_len), jnp.int32)
    dummies = (dummy, dummy) if self.task.dual else (dummy,)

    self.carries_memory = self.model_config.kind == "causal_lm" and bool(
        self.model_config.mem_len or self.model_config.compressed_len)
    self._empty_memory = built.initial_memory if self.carries_memory else None

    def init(rng):
      variables = self.model.init({"params": rng, "dropout": rng}, *dummies, train=False)
      params = variables["params"]
      model_state = {k: v for k, v in variables.items() if k != "params"}
      if self.carries_memory:  # carried across steps in the state, so checkpoints hold it
        model_state["memory"] = self._boxed_memory(config.batch_size)
      # An integer export is evaluated only: no optimizer state over its integers.
      opt_state = self.tx.init(params) if trains else ()
      return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=opt_state, model_state=model_state)

    with self.context(), kernel.recording() as seen:
      boxed = jax.eval_shape(init, self.init_key)
      self.state_shardings = sharding.tree_shardings(boxed, self.mesh, self.rules)
      self.abstract_state = ckpt.abstract_like(sharding.strip_boxes(boxed),
                                              self.state_shardings)
      self._init = jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=self.state_shardings)
    # What implementation="auto" chose where the model calls attention (families off
    # the kernel run plain XLA ops).
    self.attention_backend = ", ".join(sorted(seen)) or "xla"
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.eval_carry_sharding = None
    if self.task.kind == "lm":
      self.objective = objectives.LanguageModel(
          self.model, self._empty_memory,
          best_metric=objectives.selection_metric(config)[0])
      if self.carries_memory:
        self.eval_carry_sharding = self.state_shardings.model_state["memory"]
    else:
      self.objective = objectives.Classification(self.model)
    self.extra = None  # what the objective needs besides the state (a teacher)
    objective, self.teacher = None, None
    if teacher is None:
      # A distilled sentence encoder is evaluated against its teacher, so evaluation
      # needs it too.
      teacher = not evaluation_only or self.task.kind == "embedding"
    if teacher:
      objective, self.teacher = teachers.setup(config, self.task, self.model_config,
                                              self.model)
    if objective is not None:
      self.objective = objective
      self.extra = jax.device_put(self.teacher.variables, sharding.replicated(self.mesh))
    self._train_step = None
    self._eval_step = jax.jit(functools.partial(steps.eval_step, objective=self.objective),
                              out_shardings=(sharding.replicated(self.mesh),
                                             self.eval_carry_sharding))

  def _boxed_memory(self, batch: int):
    return {name: nn.LogicallyPartitioned(value, layer_memory.memory_axes(name))
            for name, value in self._empty_memory(batch).items()}

  def context(self):
    """Mesh and logical-axis rules, for tracing and running the steps."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def init_state(self) -> steps.TrainState:
    with self.context():
      return self._init(self.init_key)

  def jitted_train_step(self):
    """The training step, jitted with the state's and batch's shardings and the state
    donated: ``(state, batch, extra) -> (state, metrics)``. Ahead-of-time compilation
    lowers this same function."""
    fn = functools.partial(steps.train_step, objective=self.objective, tx=self.tx,
                           schedule=self.schedule, dropout_key=self.dropout_key,
                           accumulate=self.config.grad_accum_steps)
    extra = sharding.replicated(self.mesh) if self.extra is not None else None
    return jax.jit(fn, in_shardings=(self.state_shardings, self.batch_sharding, extra),
                   out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                   donate_argnums=(0,))

  def train_step(self, state, batch):
    if self._train_step is None:
      self._train_step = self.jitted_train_step()
    with self.context():
      return self._train_step(state, sharding.global_batch(batch, self.mesh), self.extra)

  def evaluate(self, params, model_state, split: str, *, limit: int | None = None
               ) -> dict[str, float]:
    """The objective's metrics (accuracy, loss, example count) of ``params`` on the first
    ``limit`` examples of ``split`` (None: all of it)."""
    totals = {}
    with self.context():
      carry = self.objective.eval_carry(self.config.batch_size)
      if carry is not None:
        carry = jax.device_put(carry, self.eval_carry_sharding)
      for batch in pipeline.eval_batches(self.task.splits[split], self.config.batch_size,
                                         max_examples=limit):
        sums, carry = self._eval_step(params, model_state,
                                      sharding.global_batch(batch, self.mesh), carry,
                                      self.extra)
        sums = jax.device_get(sums)
        for k, v in sums.items():
          totals[k] = totals.get(k, 0.0) + float(v)
    return self.objective.eval_metrics(totals)

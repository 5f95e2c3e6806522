"""Distillation: train a student toward a frozen teacher, in the one training loop.

The teacher is a finished ``effx.train`` workdir (``config.distill.teacher_workdir``):
its ``config.json`` builds the teacher model and its best-on-validation parameters are
loaded. Or it is a pretrained BERT-family model folder (``config.distill.teacher_model``,
``effx.pretrained``), whose sentence encoder (``model.kind="encoder"``) teaches a
student encoder on unlabeled text (``data.task="sentences"``): then the output loss is
``embedding_weight · (1 - cos(student, teacher))`` on the sentence embeddings (kd / ce
need logits and labels and must be 0), and the student is evaluated, and its best
checkpoint chosen, by the mean cosine similarity of its embeddings to the teacher's.

The teacher's forward pass runs inside the student's jitted step, on the same batch,
without gradients; its variables are an argument of the step (not part of the student's
state: never donated, never checkpointed). ``workdir/teacher.json`` records
the teacher's path, step and a SHA-256 of its parameters; a resumed run refuses a
teacher whose parameters changed.

Losses (each with its weight in ``config.distill``; token-level ones averaged over real
tokens only):

* ``embedding_weight``: ``1 - cos`` of the student's and teacher's sentence embeddings
  (encoders only).
* ``kd_weight``: Hinton et al. 2015, ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` on the
  logits (T = ``temperature``; T² keeps its gradients on the scale of the hard loss).
* ``ce_weight``: cross-entropy on the labels (DistilBERT's α_ce on the hard targets).
* ``hidden_weight``: each student layer's output against the teacher layer
  ``layer_map`` assigns to it, ``hidden_loss="mse"`` (TinyBERT) or ``"cosine"``
  (DistilBERT: 1 - cos). Needs equal ``emb_dim``.
* ``attention_weight``: attention-output transfer (each student layer's attention
  sub-block output against its teacher layer's, MSE, each model on its own layer
  input), the loss that turns a softmax model into an efficient-attention one (T2R,
  Hedgehog, LoLCATs).
* ``value_relation_weight``: MiniLM's value relation, ``KL(R_t ‖ R_s)`` with
  ``R = softmax(V Vᵀ / √d_r)`` per relation head over real keys, averaged over real
  queries, heads and mapped layers. The values of all heads are concatenated and split
  into ``relation_heads`` heads (0: the teacher's ``num_heads``) of width ``d_r``
  (MiniLMv2), so it needs neither equal widths nor equal head counts, and every family
  has values: any two single-sequence classifiers or encoders with the same ``pool`` and
  plain (not reversible) stacks.
* ``attention_kl_weight``: TinyBERT / MiniLM attention-distribution transfer,
  ``KL(A_t ‖ A_s)`` with ``A = softmax(Q Kᵀ / √d_head)`` per head. Only for models
  whose attention *is* that distribution (``dense``, ``blockwise``) with equal
  ``num_heads``.

The relation losses read each layer's projected heads, which ``SelfAttention`` sows
into the ``intermediates`` collection; the reversible stack does not expose them. They
build ``[layers, batch, heads, length, length]`` float32 maps for both models (memory
O(length²), like dense attention), and average over every real query of the batch
(longer sequences weigh more; MiniLM averages per sequence).

The student's layer outputs are taken in training mode (with its dropout), the
teacher's at evaluation: with dropout on, the token losses carry that noise.

``layer_map`` (default uniform): student layer i learns from teacher layer
``(i + 1) · k - 1`` with ``k = teacher layers / student layers``. With
``init_from_teacher``, a new student starts from the teacher's embeddings, head and the
mapped layers (DistilBERT takes every other layer); the student may use another
attention family: parameter-free families have dense attention's parameter tree, so this
is a copy, and a family's own parameters (Linformer projections, Synthesizer tables,
Routing centroids) that the teacher lacks keep their fresh initialisation (logged).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from effx import axes, models, quant
from effx import workdir as workdir_lib
from effx.objectives import Classification, forward

DEFAULTS = dict(teacher_workdir="", teacher_model="", temperature=2.0, kd_weight=1.0,
                ce_weight=0.1, embedding_weight=0.0, hidden_weight=0.0, hidden_loss="mse",
                attention_weight=0.0, value_relation_weight=0.0, attention_kl_weight=0.0,
                relation_heads=0, layer_map=(), init_from_teacher=False)
# The student keys that must equal a pretrained teacher's for init_from_teacher: the
# checkpoint's weights mean something only under the same computation.
ARCHITECTURE_KEYS = ("emb_dim", "num_heads", "qkv_dim", "mlp_dim", "vocab_size", "max_len",
                     "pool", "positional", "norm", "layer_norm_eps", "activation",
                     "type_vocab_size", "normalize")
HIDDEN_LOSSES = ("mse", "cosine")
# Families whose output is exactly softmax(QKᵀ/√d)V over every key: their attention
# distribution is the one attention_kl_weight compares.
SOFTMAX_FAMILIES = ("dense", "blockwise")
_log = logging.getLogger(__name__)


def defaults() -> ml_collections.ConfigDict:
  """``config.distill`` with every key at its default (``teacher_workdir=""`` and
  ``teacher_model=""``: off; a distillation config sets one to None, which must be
  overridden)."""
  return ml_collections.ConfigDict(dict(DEFAULTS))


def uniform_layer_map(student_layers: int, teacher_layers: int) -> tuple[int, ...]:
  """Student layer i <- teacher layer (i + 1) * k - 1, k = teacher / student (integer
  division, at least 1; the last student layer always maps to the last teacher layer)."""
  k = max(teacher_layers // student_layers, 1)
  mapped = [min((i + 1) * k - 1, teacher_layers - 1) for i in range(student_layers)]
  mapped[-1] = teacher_layers - 1
  return tuple(mapped)


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
    from effx import checkpoint as ckpt  # noqa: PLC0415 (trainer imports this module)
    from effx import trainer, validate  # noqa: PLC0415

    where = f"distill.teacher_workdir={workdir!r}"
    if not os.path.isdir(workdir):
      raise FileNotFoundError(f"{where}: no such folder (the workdir of a finished "
                              "effx.train run)")
    try:
      config = trainer.load_workdir_config(workdir)
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
    self.model = quant.wrap(models.build(teacher_model_config), config.quant)
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
    from effx import pretrained  # noqa: PLC0415 (imports models)

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
  from effx import pretrained  # noqa: PLC0415

  folder = data.get("tokenizer") or pretrained.default_folder()
  mine = os.path.join(os.path.expanduser(folder), "tokenizer.json")
  with open(mine, "rb") as a, open(teacher.tokenizer_file, "rb") as b:
    if a.read() != b.read():
      raise ValueError(f"data.tokenizer={folder!r} is not the teacher's tokenizer "
                       f"({teacher.tokenizer_file}); tokenize with the teacher's folder")


def init_student(student_params, teacher_params, layer_map: tuple[int, ...]):
  """The student's parameters with every leaf the teacher has copied in: layer-stacked
  leaves (``.../layers/...``, leading layer axis) take the teacher's ``layer_map``
  layers, the rest (embeddings, norms, head) are copied whole. Raises on a shape that
  cannot be copied; leaves the teacher lacks stay as initialised (returned by name)."""
  teacher_flat = {axes.path_name(p): v
                  for p, v in jax.tree_util.tree_flatten_with_path(teacher_params)[0]}
  kept, index = [], np.asarray(layer_map)

  def take(path, leaf):
    name = axes.path_name(path)
    if name not in teacher_flat:
      kept.append(name)
      return leaf
    source = teacher_flat[name]
    if axes.stacked_over_layers(path):
      source = jnp.take(source, index, axis=0)
    if source.shape != leaf.shape:
      raise ValueError(f"distill.init_from_teacher: {name} is {tuple(source.shape)} in the "
                       f"teacher's mapped layers, {tuple(leaf.shape)} in the student; "
                       "initialising from the teacher needs the same widths")
    # A copy: the student's state is donated to the step, the teacher's variables are not.
    return jnp.array(source, dtype=leaf.dtype, copy=True)

  params = jax.tree_util.tree_map_with_path(take, student_params)
  return params, kept


def _token_mean(per_token: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of ``per_token`` ``[layers, batch, length]`` over real tokens."""
  weights = mask.astype(jnp.float32)[None]
  return jnp.sum(per_token * weights) / jnp.maximum(
      jnp.sum(weights) * per_token.shape[0], 1.0)


def _captured(aux) -> dict[str, jax.Array]:
  """The ``{"q", "k", "v"}`` heads ``[layers, batch, length, heads, head_dim]`` that the
  encoder's SelfAttention sowed (``forward(..., capture=True)``)."""
  node = aux["intermediates"]
  while "qkv" not in node:
    (node,) = node.values()  # one path down to the attention module
  return node["qkv"][0]


def _masked_kl(t_logits, s_logits, mask) -> jax.Array:
  """``KL(softmax(t) ‖ softmax(s))`` over real keys, averaged over real queries and over
  the other axes; logits ``[layers, batch, heads, q, k]``, ``mask [batch, length]``."""
  keys = mask[None, :, None, None, :]
  t = jax.nn.log_softmax(jnp.where(keys, t_logits, -1e30), axis=-1)
  s = jax.nn.log_softmax(jnp.where(keys, s_logits, -1e30), axis=-1)
  per_query = jnp.sum(jnp.where(keys, jnp.exp(t) * (t - s), 0.0), axis=-1)
  weights = jnp.broadcast_to(mask[None, :, None, :], per_query.shape).astype(jnp.float32)
  return jnp.sum(per_query * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def relation_logits(x: jax.Array, heads: int) -> jax.Array:
  """MiniLMv2 relation logits ``x xᵀ / √d_r``: ``x [layers, batch, length, h, d]`` has its
  ``h · d`` features split into ``heads`` relation heads of ``d_r = h · d / heads``.
  Returns ``[layers, batch, heads, length, length]`` in float32."""
  layers, batch, length = x.shape[:3]
  x = x.reshape(layers, batch, length, heads, -1).astype(jnp.float32)
  return jnp.einsum("nbqhd,nbkhd->nbhqk", x, x) * x.shape[-1] ** -0.5


def attention_logits(q: jax.Array, k: jax.Array) -> jax.Array:
  """Softmax attention logits ``q kᵀ / √d_head``, ``[layers, batch, heads, q, k]``."""
  q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  return jnp.einsum("nbqhd,nbkhd->nbhqk", q, k) * q.shape[-1] ** -0.5


class Distillation(Classification):
  """The student's distillation loss; evaluated (and its best checkpoint chosen) as a
  classifier on the labels, or, for sentence encoders (``embedding=True``), by the mean
  cosine similarity of its embeddings to the teacher's. ``layer_map``: the teacher layer
  of each student layer; ``relation_heads``: the value relation's head count (``setup``
  resolves the config's 0 to the teacher's ``num_heads``)."""

  progress = ("loss", "accuracy", "kd")

  def __init__(self, model: nn.Module, teacher_model: nn.Module, options: Any,
               layer_map: tuple[int, ...], relation_heads: int, *, embedding: bool = False):
    super().__init__(model)
    self.teacher_model = teacher_model
    self.embedding = embedding
    if embedding:
      self.best_metric, self.progress = "cosine", ("loss", "cosine")
    self.temperature = float(options.temperature)
    self.weights = {k: float(options[f"{k}_weight"])
                    for k in ("kd", "ce", "embedding", "hidden", "attention",
                              "value_relation", "attention_kl")}
    self.hidden_loss = options.hidden_loss
    self.layer_map = layer_map
    self.relation_heads = relation_heads
    self.capture = bool(self.weights["value_relation"] or self.weights["attention_kl"])

  def loss(self, params, model_state, batch, rng, extra: Any = None):
    logits, aux, new_state = forward(self.model, params, model_state, batch, train=True,
                                     rng=rng, capture=self.capture)
    t_logits, t_aux, _ = forward(self.teacher_model, extra["params"], extra["model_state"],
                                 batch, train=False, capture=self.capture)
    t_logits, t_aux = jax.lax.stop_gradient((t_logits, t_aux))
    logits, t_logits = logits.astype(jnp.float32), t_logits.astype(jnp.float32)
    if self.embedding:
      cosine = jnp.mean(_cosine(logits, t_logits))
      values = {"cosine": cosine}
      total = self.weights["embedding"] * (1.0 - cosine)
    else:
      t = self.temperature
      soft = jax.nn.softmax(t_logits / t)
      kd = t * t * jnp.mean(jnp.sum(soft * (jax.nn.log_softmax(t_logits / t)
                                            - jax.nn.log_softmax(logits / t)), axis=-1))
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
      values = {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["targets"]),
                "kd": kd, "ce": ce}
      total = self.weights["kd"] * kd + self.weights["ce"] * ce
    index = jnp.asarray(self.layer_map)
    if self.weights["hidden"]:
      s_h = aux["hidden"].astype(jnp.float32)
      t_h = jnp.take(t_aux["hidden"], index, axis=0).astype(jnp.float32)
      if self.hidden_loss == "mse":
        per_token = jnp.mean(jnp.square(s_h - t_h), axis=-1)
      else:
        cos = jnp.sum(s_h * t_h, -1) / jnp.maximum(
            jnp.linalg.norm(s_h, axis=-1) * jnp.linalg.norm(t_h, axis=-1), 1e-8)
        per_token = 1.0 - cos
      values["hidden"] = _token_mean(per_token, aux["mask"])
      total = total + self.weights["hidden"] * values["hidden"]
    if self.weights["attention"]:
      s_a = aux["attention"].astype(jnp.float32)
      t_a = jnp.take(t_aux["attention"], index, axis=0).astype(jnp.float32)
      values["attention"] = _token_mean(jnp.mean(jnp.square(s_a - t_a), axis=-1), aux["mask"])
      total = total + self.weights["attention"] * values["attention"]
    if self.capture:
      s_heads = _captured(aux)
      t_heads = {k: jnp.take(v, index, axis=0) for k, v in _captured(t_aux).items()}
    if self.weights["value_relation"]:
      values["value_relation"] = _masked_kl(
          relation_logits(t_heads["v"], self.relation_heads),
          relation_logits(s_heads["v"], self.relation_heads), aux["mask"])
      total = total + self.weights["value_relation"] * values["value_relation"]
    if self.weights["attention_kl"]:
      values["attention_kl"] = _masked_kl(attention_logits(t_heads["q"], t_heads["k"]),
                                          attention_logits(s_heads["q"], s_heads["k"]),
                                          aux["mask"])
      total = total + self.weights["attention_kl"] * values["attention_kl"]
    return total, (values, new_state)

  def eval_sums(self, params, model_state, batch, carry=None, extra=None):
    """Classification's sums; for encoders, the summed cosine similarity to the
    teacher's embeddings (``extra``: the teacher's variables)."""
    if not self.embedding:
      return super().eval_sums(params, model_state, batch, carry)
    if extra is None:
      raise ValueError("evaluating a distilled encoder needs its teacher (extra)")
    out, _, _ = forward(self.model, params, model_state, batch, train=False)
    t_out, _, _ = forward(self.teacher_model, extra["params"], extra["model_state"], batch,
                          train=False)
    cosine = _cosine(out.astype(jnp.float32), t_out.astype(jnp.float32))
    weights = batch["weights"]
    return {"cosine": jnp.sum(cosine * weights), "loss": jnp.sum((1.0 - cosine) * weights),
            "count": jnp.sum(weights)}, carry

  def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
    if not self.embedding:
      return Classification.eval_metrics(totals)
    count = max(totals["count"], 1.0)
    return {"cosine": totals["cosine"] / count, "loss": totals["loss"] / count,
            "examples": int(totals["count"])}


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Cosine similarity of the rows of ``a`` and ``b`` ``[batch, d]``."""
  return jnp.sum(a * b, -1) / jnp.maximum(
      jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-8)


def setup(config, task, student_model_config, student_model):
  """``(objective, teacher)`` for ``config`` when ``config.distill.teacher_workdir`` is
  set, else ``(None, None)``. Raises one clear message on a bad teacher or options."""
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
  embedding = student_model_config.kind == "encoder"
  if options.embedding_weight and not embedding:
    raise ValueError("distill.embedding_weight compares sentence embeddings: it needs "
                     f"model.kind='encoder' (this student is {student_model_config.kind!r})")
  if embedding and options.init_from_teacher:
    differ = [f"model.{k}={getattr(student_model_config, k)!r} (teacher "
              f"{getattr(teacher.model_config, k)!r})" for k in ARCHITECTURE_KEYS
              if getattr(student_model_config, k) != getattr(teacher.model_config, k)]
    if differ:
      raise ValueError("distill.init_from_teacher copies the teacher's weights, which needs "
                       "its architecture: " + ", ".join(differ))
  s_layers, t_layers = student_model_config.num_layers, teacher.model_config.num_layers
  layer_map = tuple(options.layer_map) or uniform_layer_map(s_layers, t_layers)
  if len(layer_map) != s_layers or not all(0 <= i < t_layers for i in layer_map):
    raise ValueError(f"distill.layer_map={tuple(options.layer_map)} must give one teacher "
                     f"layer (0..{t_layers - 1}) for each of the student's {s_layers} layers")
  if options.init_from_teacher and config.init_checkpoint:
    raise ValueError("config.init_checkpoint and distill.init_from_teacher both say where "
                     "the student starts: set one")
  token_losses = options.hidden_weight or options.attention_weight
  if token_losses and student_model_config.kind not in ("classifier", "encoder"):
    raise ValueError("distill.hidden_weight / attention_weight need model.kind='classifier' "
                     f"or 'encoder' (this student is {student_model_config.kind!r})")
  if token_losses and student_model_config.emb_dim != teacher.model_config.emb_dim:
    raise ValueError(
        f"distill.hidden_weight / attention_weight compare layer outputs, which needs equal "
        f"model.emb_dim (teacher {teacher.model_config.emb_dim}, student "
        f"{student_model_config.emb_dim}); a learned projection between widths is not "
        "implemented yet")
  if token_losses and student_model_config.pool != teacher.model_config.pool:
    raise ValueError(f"distill.hidden_weight / attention_weight need the same model.pool "
                     f"(teacher {teacher.model_config.pool!r}, student "
                     f"{student_model_config.pool!r}): the CLS token shifts positions")
  relation_heads = _check_relation_losses(options, student_model_config, teacher.model_config)
  objective = Distillation(student_model, teacher.model, options, layer_map, relation_heads,
                           embedding=embedding)
  return objective, teacher


def _check_relation_losses(options, student, teacher) -> int:
  """The number of relation heads; raises when a relation loss cannot apply."""
  if options.relation_heads and not options.value_relation_weight:
    raise ValueError(f"distill.relation_heads={options.relation_heads} set but "
                     "distill.value_relation_weight is 0: relation heads are the value "
                     "relation's")
  if not (options.value_relation_weight or options.attention_kl_weight):
    return 1
  for who, cfg in (("teacher", teacher), ("student", student)):
    if cfg.kind not in ("classifier", "encoder"):
      raise ValueError("distill.value_relation_weight / attention_kl_weight need "
                       f"model.kind='classifier' or 'encoder' (the {who} is {cfg.kind!r})")
    if cfg.reversible:
      raise ValueError("distill.value_relation_weight / attention_kl_weight read each "
                       f"layer's heads, which the reversible stack does not expose (the {who}"
                       " has model.reversible=True)")
  if student.pool != teacher.pool:
    raise ValueError(f"distill.value_relation_weight / attention_kl_weight need the same "
                     f"model.pool (teacher {teacher.pool!r}, student {student.pool!r}): the "
                     "CLS token shifts positions")
  if options.attention_kl_weight:
    for who, cfg in (("teacher", teacher), ("student", student)):
      if cfg.attention not in SOFTMAX_FAMILIES:
        raise ValueError(
            f"distill.attention_kl_weight compares softmax attention distributions; the "
            f"{who}'s model.attention={cfg.attention!r} has none (families with one: "
            f"{', '.join(SOFTMAX_FAMILIES)}); use distill.value_relation_weight or "
            "distill.attention_weight, which work for every family")
    if student.num_heads != teacher.num_heads:
      raise ValueError(f"distill.attention_kl_weight compares head by head: the teacher has "
                       f"model.num_heads={teacher.num_heads}, the student {student.num_heads}")
  heads = options.relation_heads or teacher.num_heads
  if options.value_relation_weight and (student.qkv_dim % heads or teacher.qkv_dim % heads):
    raise ValueError(f"distill.relation_heads={heads} must divide both models' model.qkv_dim "
                     f"(teacher {teacher.qkv_dim}, student {student.qkv_dim})" +
                     ("" if options.relation_heads else
                      "; 0 means the teacher's num_heads: set it explicitly"))
  return heads

"""Distillation: train a student toward a frozen teacher, in the one training loop.

The teacher is a finished ``effx.train`` workdir (``config.distill.teacher_workdir``):
its ``config.json`` builds the teacher model and its best-on-validation parameters are
loaded. Or it is a pretrained BERT-family model folder (``config.distill.teacher_model``,
``effx.pretrained``), whose sentence encoder (``model.kind="encoder"``) teaches a
student encoder on unlabeled text (``data.task="sentences"``): then the output loss is
``embedding_weight · (1 - cos(student, teacher))`` on the sentence embeddings (kd / ce
need logits and labels and must be 0), and the student is evaluated, and its best
checkpoint chosen, by the mean cosine similarity of its embeddings to the teacher's.

This module holds the losses, the layer maps, the copy of a teacher's layers into a
new student and every check of ``config.distill``; ``effx.training.teachers`` loads the
teacher and ``effx.training.objectives.Distillation`` runs both models. The teacher's
forward pass runs inside the student's jitted step, on the same batch,
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

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from effx.common import axes, schema

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


def uniform_layer_map(student_layers: int, teacher_layers: int) -> tuple[int, ...]:
  """Student layer i <- teacher layer (i + 1) * k - 1, k = teacher / student (integer
  division, at least 1; the last student layer always maps to the last teacher layer)."""
  k = max(teacher_layers // student_layers, 1)
  mapped = [min((i + 1) * k - 1, teacher_layers - 1) for i in range(student_layers)]
  mapped[-1] = teacher_layers - 1
  return tuple(mapped)


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


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Cosine similarity of the rows of ``a`` and ``b`` ``[batch, d]``."""
  return jnp.sum(a * b, -1) / jnp.maximum(
      jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-8)



class Losses:
  """The weighted losses of ``config.distill`` between a student's and a teacher's
  outputs on one batch. ``layer_map``: the teacher layer of each student layer;
  ``relation_heads``: the value relation's head count (``check_pair`` resolves the
  config's 0); ``embedding``: sentence encoders (the output loss is 1 - cos of the
  embeddings; kd and ce need logits and labels)."""

  def __init__(self, options: Any, layer_map: tuple[int, ...], relation_heads: int, *,
               embedding: bool = False):
    self.embedding = embedding
    self.temperature = float(options.temperature)
    self.weights = {k: float(options[f"{k}_weight"])
                    for k in ("kd", "ce", "embedding", "hidden", "attention",
                              "value_relation", "attention_kl")}
    self.hidden_loss = options.hidden_loss
    self.layer_map = layer_map
    self.relation_heads = relation_heads
    # The relation losses read each layer's projected heads (forward(capture=True)).
    self.capture = bool(self.weights["value_relation"] or self.weights["attention_kl"])

  def __call__(self, logits, aux, t_logits, t_aux, batch) -> tuple[jax.Array, dict]:
    """``(total, values)``: the weighted sum and each loss (plus accuracy / cosine) of
    the student's ``logits, aux`` against the teacher's (gradients stopped) on
    ``batch``."""
    t_logits, t_aux = jax.lax.stop_gradient((t_logits, t_aux))
    logits, t_logits = logits.astype(jnp.float32), t_logits.astype(jnp.float32)
    if self.embedding:
      mean_cosine = jnp.mean(cosine(logits, t_logits))
      values = {"cosine": mean_cosine}
      total = self.weights["embedding"] * (1.0 - mean_cosine)
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
    return total, values


def defaults() -> ml_collections.ConfigDict:
  """``config.distill`` with every key at its default (``teacher_workdir=""`` and
  ``teacher_model=""``: off; a distillation config sets one to None, which must be
  overridden)."""
  return ml_collections.ConfigDict(dict(DEFAULTS))


def teacher_of(section: Mapping[str, Any]) -> str:
  """The teacher a ``config.distill`` names (a workdir or a model folder; "" for none)."""
  return section.get("teacher_workdir") or section.get("teacher_model") or ""


# Every check of config.distill is in this module: ``check`` before anything is loaded,
# ``check_pair`` once the teacher's model is known.


def check(section: Mapping[str, Any], *, kind: str, task: str,
          init_checkpoint: str = "") -> None:
  """``config.distill`` for a student of model kind ``kind`` on ``data.task=task``: keys,
  types, values that cannot work, and losses the student's kind does not have."""
  values = dict(section)
  for key, what in (("teacher_workdir", "the workdir of a finished effx.train run"),
                    ("teacher_model", "a pretrained model folder")):
    if values.get(key, "") is None:
      raise ValueError(f"distill.{key} is not set: pass --config.distill.{key}=<{what}>")
  schema.check_section("distill", values, DEFAULTS)
  values = {**DEFAULTS, **values}
  if values["teacher_workdir"] and values["teacher_model"]:
    raise ValueError(f"distill.teacher_workdir={values['teacher_workdir']!r} and "
                     f"distill.teacher_model={values['teacher_model']!r} both name a "
                     "teacher; set one")
  for key in ("kd_weight", "ce_weight", "embedding_weight", "hidden_weight",
              "attention_weight", "value_relation_weight", "attention_kl_weight",
              "relation_heads"):
    if values[key] < 0:
      raise ValueError(f"distill.{key}={values[key]} must be >= 0")
  if values["temperature"] <= 0:
    raise ValueError(f"distill.temperature={values['temperature']} must be positive")
  if values["hidden_loss"] not in HIDDEN_LOSSES:
    raise ValueError(f"distill.hidden_loss={values['hidden_loss']!r}; one of "
                     f"{', '.join(HIDDEN_LOSSES)}")
  teacher = teacher_of(values)
  if not teacher:
    changed = [k for k, default in DEFAULTS.items()
               if k not in ("teacher_workdir", "teacher_model")
               and schema.normalise(values[k]) != schema.normalise(default)]
    if changed:
      raise ValueError(f"{', '.join('distill.' + k for k in changed)} set but no teacher: set "
                       "distill.teacher_workdir (a finished run) or distill.teacher_model (a "
                       "pretrained model folder), or leave the distill section at its "
                       "defaults")
  if kind == "causal_lm" and teacher:
    raise ValueError(f"distill teacher {teacher!r}: distillation of a language model "
                     f"(data.task={task!r}) is not supported; unset it")
  if kind == "encoder":
    if not teacher:
      raise ValueError(f"data.task={task!r} has no labels: it trains a sentence encoder "
                       "toward a teacher; set distill.teacher_model (a pretrained model "
                       "folder) or distill.teacher_workdir")
    if values["kd_weight"] or values["ce_weight"]:
      raise ValueError(f"distill.kd_weight={values['kd_weight']} / ce_weight="
                       f"{values['ce_weight']}: a sentence encoder has neither logits nor "
                       "labels; set both to 0 and use distill.embedding_weight (and hidden / "
                       "attention / value-relation losses)")
    weights = ("embedding_weight", "hidden_weight", "attention_weight",
               "value_relation_weight", "attention_kl_weight")
    if not any(values[k] for k in weights):
      raise ValueError(f"every loss weight of the sentence encoder is 0: set at least one "
                       f"of {', '.join('distill.' + k for k in weights)}")
  elif values["embedding_weight"]:
    raise ValueError("distill.embedding_weight compares sentence embeddings: it needs "
                     f"model.kind='encoder' (this student is {kind!r})")
  if values["init_from_teacher"] and init_checkpoint:
    raise ValueError("config.init_checkpoint and distill.init_from_teacher both say where "
                     "the student starts: set one")


def check_pair(options: Any, student, teacher) -> tuple[tuple[int, ...], int]:
  """Checks that ``config.distill``'s losses can compare this student with this teacher
  (``ModelConfig`` each); returns ``(layer_map, relation_heads)`` with the config's
  defaults resolved."""
  if student.kind == "encoder" and options.init_from_teacher:
    differ = [f"model.{k}={getattr(student, k)!r} (teacher {getattr(teacher, k)!r})"
              for k in ARCHITECTURE_KEYS if getattr(student, k) != getattr(teacher, k)]
    if differ:
      raise ValueError("distill.init_from_teacher copies the teacher's weights, which needs "
                       "its architecture: " + ", ".join(differ))
  s_layers, t_layers = student.num_layers, teacher.num_layers
  layer_map = tuple(options.layer_map) or uniform_layer_map(s_layers, t_layers)
  if len(layer_map) != s_layers or not all(0 <= i < t_layers for i in layer_map):
    raise ValueError(f"distill.layer_map={tuple(options.layer_map)} must give one teacher "
                     f"layer (0..{t_layers - 1}) for each of the student's {s_layers} layers")
  token_losses = options.hidden_weight or options.attention_weight
  if token_losses and student.kind not in ("classifier", "encoder"):
    raise ValueError("distill.hidden_weight / attention_weight need model.kind='classifier' "
                     f"or 'encoder' (this student is {student.kind!r})")
  if token_losses and student.emb_dim != teacher.emb_dim:
    raise ValueError(
        f"distill.hidden_weight / attention_weight compare layer outputs, which needs equal "
        f"model.emb_dim (teacher {teacher.emb_dim}, student {student.emb_dim}); a learned "
        "projection between widths is not implemented yet")
  if token_losses and student.pool != teacher.pool:
    raise ValueError(f"distill.hidden_weight / attention_weight need the same model.pool "
                     f"(teacher {teacher.pool!r}, student {student.pool!r}): the CLS token "
                     "shifts positions")
  return layer_map, _relation_heads(options, student, teacher)


def _relation_heads(options, student, teacher) -> int:
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

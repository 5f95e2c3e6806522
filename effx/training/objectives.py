"""What the one training loop optimises: an objective.

An objective gives the training loss (it sees the model's ``aux``: per-layer hidden
states and attention outputs), the sums an evaluation accumulates, the metrics made from
them, the metric that picks the best checkpoint, and what the progress line shows. The
trainer, its checkpoints, resume and sharding are the same for every objective.

* ``Classification``: cross-entropy on class labels (every LRA task).
* ``Distillation``: the student's losses against a frozen teacher's outputs on the same
  batch (``effx.compress.distill``); evaluated as classification, or a sentence
  encoder by its cosine to the teacher.
* ``LanguageModel``: next-token cross-entropy of a causal LM, bits per byte; with segment
  memory, the memory is carried from step to step in the training state (so checkpoints
  hold it) and from batch to batch in evaluation (the objective's evaluation ``carry``).

Evaluation runs ``eval_sums(params, model_state, batch, carry, extra) -> (sums, carry)``
over a split's batches in order, starting from ``eval_carry(batch_size)`` (None for
objectives that carry nothing); ``extra`` is what ``loss`` gets too (a teacher's
variables: a distilled sentence encoder is evaluated against its teacher).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from effx.compress import distill
from effx.layers.memory import reset_memory


def model_inputs(batch: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
  return (batch["inputs"], batch["inputs2"]) if "inputs2" in batch else (batch["inputs"],)


def forward(model: nn.Module, params, model_state, batch, *, train: bool, rng=None,
            capture: bool = False, **kwargs):
  """``(logits, aux, new_model_state)`` of ``model`` on ``batch``; mutable collections
  (routing centroids) are updated only in training. ``capture=True`` adds
  ``aux["intermediates"]``: what the layers ``sow`` (each SelfAttention's projected
  heads ``qkv``, stacked over layers).

  In training, what the layers sow into ``losses`` is summed into
  ``aux["auxiliary_loss"]`` (a scalar every objective adds to its loss: adaptive span's
  penalty) and what they sow into ``metrics`` is flattened into
  ``aux["reported"]`` (scalars ``name/<layer>/<index>``, e.g. ``span/0/3``)."""
  variables = {"params": params, **model_state}
  rngs = {"dropout": rng} if train else {}
  mutable = ((list(model_state) + ["losses", "metrics"] if train else [])
             + (["intermediates"] if capture else []))
  if not mutable:
    logits, aux = model.apply(variables, *model_inputs(batch), train=train, rngs=rngs,
                              **kwargs)
    return logits, aux, model_state
  (logits, aux), updated = model.apply(variables, *model_inputs(batch), train=train,
                                       rngs=rngs, mutable=mutable, **kwargs)
  updated = dict(updated)
  intermediates = updated.pop("intermediates", {})
  losses, reported = updated.pop("losses", {}), updated.pop("metrics", {})
  if capture:
    aux = {**aux, "intermediates": intermediates}
  if train:
    aux = {**aux, "auxiliary_loss": sum((jnp.sum(x.astype(jnp.float32))
                                         for x in jax.tree.leaves(losses)), jnp.zeros(())),
           "reported": _flatten_reported(reported)}
  return logits, aux, (updated if train and model_state else model_state)


def _flatten_reported(tree) -> dict[str, jax.Array]:
  """Sown values to scalar metrics: the leaves sown under one name (one per layer, or
  stacked over layers by the scan) become rows, their elements columns:
  ``name/<row>/<column>``."""
  rows: dict[str, list[jax.Array]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = next(str(k.key) for k in reversed(path) if hasattr(k, "key"))
    leaf = jnp.asarray(leaf, jnp.float32)
    rows.setdefault(name, []).append(leaf.reshape(-1, leaf.shape[-1]) if leaf.ndim
                                     else leaf.reshape(1, 1))
  out = {}
  for name, parts in rows.items():
    table = jnp.concatenate(parts)
    for r in range(table.shape[0]):
      for c in range(table.shape[1]):
        out[f"{name}/{r}/{c}"] = table[r, c]
  return out


def with_auxiliary(loss: jax.Array, values: dict[str, jax.Array], aux: dict
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """An objective's training ``loss`` and ``values`` plus what the model reported in
  ``aux`` (its auxiliary loss, added; its metrics, merged): the same for every
  objective."""
  return loss + aux["auxiliary_loss"], {**values, **aux["reported"]}


def selection_metric(config) -> tuple[str, bool]:
  """``(metric, higher_is_better)``: the validation metric that picks a run's best
  checkpoint, from its config alone (the objective ``Run`` builds uses the same rule):
  bits per byte for language models, accuracy for recall tasks (``mqar``) and
  classifiers, cosine to the teacher for distilled sentence encoders."""
  if config.data.task == "mqar":
    return "accuracy", True
  if config.model.kind == "causal_lm":
    return "bpb", False
  distilled = config.distill.teacher_workdir or config.distill.teacher_model
  if distilled and config.model.kind == "encoder":
    return "cosine", True
  return "accuracy", True


class Classification:
  """Softmax cross-entropy on integer labels; the best checkpoint has the highest
  validation accuracy."""

  best_metric = "accuracy"
  higher_is_better = True
  progress = ("loss", "accuracy")  # shown on the progress line, in this order

  def __init__(self, model: nn.Module):
    self.model = model

  def loss(self, params, model_state, batch, rng, extra: Any = None):
    """``(loss, (metrics, new_model_state))`` of a training micro-batch; ``extra`` is
    what the objective needs besides the student (unused here)."""
    del extra
    logits, aux, new_state = forward(self.model, params, model_state, batch, train=True,
                                     rng=rng)
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["targets"])
    loss, values = with_auxiliary(loss, {"accuracy": accuracy}, aux)
    return loss, (values, new_state)

  def eval_carry(self, batch_size: int):
    del batch_size
    return None

  def eval_sums(self, params, model_state, batch, carry=None, extra=None):
    """``(sums, carry)``: weighted sums over ``batch`` (``weights`` 0 marks padding
    examples); ``carry`` passes through; ``extra`` as in ``loss`` (unused here)."""
    del extra
    logits, _, _ = forward(self.model, params, model_state, batch, train=False)
    logits = logits.astype(jnp.float32)
    weights = batch["weights"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    return {"loss": jnp.sum(loss * weights), "correct": jnp.sum(correct * weights),
            "count": jnp.sum(weights)}, carry

  @staticmethod
  def eval_metrics(totals: dict[str, float]) -> dict[str, float]:
    return {"accuracy": totals["correct"] / totals["count"],
            "loss": totals["loss"] / totals["count"], "examples": int(totals["count"])}


def token_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
               ) -> dict[str, jax.Array]:
  """Summed next-token cross-entropy (nats), correct argmaxes and scored positions.

  ``logits [batch, length, vocab]``, ``targets [batch, length]`` int (0: no target);
  ``weights [batch]`` scales each example (0 for evaluation padding)."""
  scored = (targets != 0).astype(jnp.float32)
  if weights is not None:
    scored = scored * weights[:, None]
  logits = logits.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return {"loss": jnp.sum(nll * scored), "correct": jnp.sum(correct * scored),
          "count": jnp.sum(scored)}


class LanguageModel:
  """Next-token cross-entropy over the positions with a target (``targets != 0``);
  the best checkpoint has the lowest validation bits per byte (``loss / ln 2``: one
  token is one byte in effx's byte-level tasks; for other vocabularies read it as bits
  per token), or the highest accuracy.

  With ``initial_memory`` (a function ``batch -> empty memory``; the model has segment
  memory), training reads the memory from ``model_state["memory"]``, empties the rows
  whose example has ``reset`` set, and stores the memory after the batch back there;
  the Compressive Transformer's reconstruction loss is added to the training loss.
  Evaluation carries its own memory through a split's batches, from empty.
  """

  def __init__(self, model: nn.Module,
               initial_memory: Callable[[int], dict[str, jax.Array]] | None = None, *,
               best_metric: str = "bpb"):
    """``best_metric``: ``"bpb"`` (lowest wins) or ``"accuracy"`` (of the next-token
    argmax over scored positions, highest wins: recall tasks)."""
    if best_metric not in ("bpb", "accuracy"):
      raise ValueError(f"best_metric={best_metric!r} is not 'bpb' or 'accuracy'")
    self.model, self.initial_memory = model, initial_memory
    self.best_metric = best_metric
    self.higher_is_better = best_metric == "accuracy"
    self.progress = ("loss", best_metric)

  def _run(self, params, model_state, batch, memory, *, train, rng=None):
    if self.initial_memory is None:
      logits, aux, new_state = forward(self.model, params, model_state, batch, train=train,
                                       rng=rng)
      return logits, aux, new_state, None
    memory = reset_memory(memory, batch["reset"])
    logits, aux, new_state = forward(self.model, params, model_state, batch, train=train,
                                     rng=rng, memory=memory)
    return logits, aux, new_state, aux["memory"]

  def loss(self, params, model_state, batch, rng, extra: Any = None):
    """``(loss, (metrics, new_model_state))``: mean cross-entropy over the batch's scored
    positions (plus the compression loss)."""
    del extra
    inner = {k: v for k, v in model_state.items() if k != "memory"}
    logits, aux, inner, memory = self._run(params, inner, batch, model_state.get("memory"),
                                           train=True, rng=rng)
    sums = token_sums(logits, batch["targets"])
    count = jnp.maximum(sums["count"], 1.0)
    ce = sums["loss"] / count
    loss, values = with_auxiliary(ce + aux.get("compression_loss", 0.0),
                                  {"bpb": ce / math.log(2), "accuracy": sums["correct"] / count},
                                  aux)
    new_state = inner if memory is None else {**inner, "memory": memory}
    return loss, (values, new_state)

  def eval_carry(self, batch_size: int):
    return None if self.initial_memory is None else self.initial_memory(batch_size)

  def eval_sums(self, params, model_state, batch, carry=None, extra=None):
    del extra
    inner = {k: v for k, v in model_state.items() if k != "memory"}
    logits, _, _, carry = self._run(params, inner, batch, carry, train=False)
    return token_sums(logits, batch["targets"], batch.get("weights")), carry

  @staticmethod
  def eval_metrics(totals: dict[str, float]) -> dict[str, float]:
    count = max(totals["count"], 1.0)
    loss = totals["loss"] / count
    return {"bpb": loss / math.log(2), "perplexity": math.exp(min(loss, 700.0)),
            "accuracy": totals["correct"] / count, "loss": loss,
            "examples": int(totals["count"])}


class Distillation(Classification):
  """A student trained toward a frozen teacher (``effx.training.teachers``) on the same
  batch: both forward passes, then ``losses`` (``effx.compress.distill.Losses``). The
  teacher's variables arrive as ``extra`` (an argument of the step: never donated, never
  checkpointed). Evaluated (and its best checkpoint chosen) as a classifier on the
  labels, or, for sentence encoders, by the mean cosine similarity of its embeddings to
  the teacher's."""

  progress = ("loss", "accuracy", "kd")

  def __init__(self, model: nn.Module, teacher_model: nn.Module, losses: distill.Losses):
    super().__init__(model)
    self.teacher_model, self.losses = teacher_model, losses
    self.embedding = losses.embedding
    self.layer_map = losses.layer_map
    if self.embedding:
      self.best_metric, self.progress = "cosine", ("loss", "cosine")

  def loss(self, params, model_state, batch, rng, extra: Any = None):
    capture = self.losses.capture
    logits, aux, new_state = forward(self.model, params, model_state, batch, train=True,
                                     rng=rng, capture=capture)
    t_logits, t_aux, _ = forward(self.teacher_model, extra["params"], extra["model_state"],
                                 batch, train=False, capture=capture)
    total, values = with_auxiliary(*self.losses(logits, aux, t_logits, t_aux, batch), aux)
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
    cosine = distill.cosine(out.astype(jnp.float32), t_out.astype(jnp.float32))
    weights = batch["weights"]
    return {"cosine": jnp.sum(cosine * weights), "loss": jnp.sum((1.0 - cosine) * weights),
            "count": jnp.sum(weights)}, carry

  def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
    if not self.embedding:
      return Classification.eval_metrics(totals)
    count = max(totals["count"], 1.0)
    return {"cosine": totals["cosine"] / count, "loss": totals["loss"] / count,
            "examples": int(totals["count"])}

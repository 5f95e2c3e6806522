"""What the one training loop optimises: an objective.

An objective gives the training loss (it sees the model's ``aux``: per-layer hidden
states and attention outputs), the sums an evaluation accumulates, the metrics made from
them, the metric that picks the best checkpoint, and what the progress line shows. The
trainer, its checkpoints, resume and sharding are the same for every objective.

* ``Classification``: cross-entropy on class labels (every LRA task).
* ``Distillation``: the student's loss against a frozen teacher's outputs on the same
  batch (``effx.distill``), plus the labels' cross-entropy; evaluated as classification.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


def model_inputs(batch: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
  return (batch["inputs"], batch["inputs2"]) if "inputs2" in batch else (batch["inputs"],)


def forward(model: nn.Module, params, model_state, batch, *, train: bool, rng=None,
            capture: bool = False):
  """``(logits, aux, new_model_state)`` of ``model`` on ``batch``; mutable collections
  (routing centroids) are updated only in training. ``capture=True`` adds
  ``aux["intermediates"]``: what the layers ``sow`` (each SelfAttention's projected
  heads ``qkv``, stacked over layers)."""
  variables = {"params": params, **model_state}
  rngs = {"dropout": rng} if train else {}
  mutable = (list(model_state) if train else []) + (["intermediates"] if capture else [])
  if not mutable:
    logits, aux = model.apply(variables, *model_inputs(batch), train=train, rngs=rngs)
    return logits, aux, model_state
  (logits, aux), updated = model.apply(variables, *model_inputs(batch), train=train,
                                       rngs=rngs, mutable=mutable)
  updated = dict(updated)
  intermediates = updated.pop("intermediates", {})
  if capture:
    aux = {**aux, "intermediates": intermediates}
  return logits, aux, (updated if train and model_state else model_state)


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
    logits, _, new_state = forward(self.model, params, model_state, batch, train=True,
                                   rng=rng)
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["targets"])
    return loss, ({"accuracy": accuracy}, new_state)

  def eval_sums(self, params, model_state, batch) -> dict[str, jax.Array]:
    """Weighted sums over ``batch`` (``weights`` 0 marks padding examples)."""
    logits, _, _ = forward(self.model, params, model_state, batch, train=False)
    logits = logits.astype(jnp.float32)
    weights = batch["weights"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    return {"loss": jnp.sum(loss * weights), "correct": jnp.sum(correct * weights),
            "count": jnp.sum(weights)}

  @staticmethod
  def eval_metrics(totals: dict[str, float]) -> dict[str, float]:
    return {"accuracy": totals["correct"] / totals["count"],
            "loss": totals["loss"] / totals["count"], "examples": int(totals["count"])}

"""Pure step functions of the training loop (jitted by the trainer with shardings)."""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint must hold to continue a run bit for bit."""

  step: jax.Array          # int32 []: optimizer steps taken
  params: Any
  opt_state: Any
  model_state: Any         # non-trained collections (e.g. routing centroids), or {}


def model_inputs(batch: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
  return (batch["inputs"], batch["inputs2"]) if "inputs2" in batch else (batch["inputs"],)


def _forward(model: nn.Module, params, model_state, batch, *, train: bool, rng=None):
  variables = {"params": params, **model_state}
  rngs = {"dropout": rng} if train else {}
  if train and model_state:
    (logits, _), new_state = model.apply(variables, *model_inputs(batch), train=True,
                                         rngs=rngs, mutable=list(model_state))
    return logits, dict(new_state)
  logits, _ = model.apply(variables, *model_inputs(batch), train=train, rngs=rngs)
  return logits, model_state


def _loss(params, model_state, batch, rng, model):
  logits, new_state = _forward(model, params, model_state, batch, train=True, rng=rng)
  logits = logits.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["targets"])
  return loss, (accuracy, new_state)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: Callable, dropout_key: jax.Array,
               accumulate: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on ``batch`` (split into ``accumulate`` micro-batches whose
  gradients are averaged). Dropout keys derive from ``(dropout_key, step)``, so a
  resumed run draws the same masks."""
  rng = jax.random.fold_in(dropout_key, state.step)
  grad_fn = jax.value_and_grad(_loss, has_aux=True)
  if accumulate == 1:
    (loss, (accuracy, model_state)), grads = grad_fn(state.params, state.model_state, batch,
                                                     rng, model)
  else:
    micro = jax.tree.map(lambda x: x.reshape(accumulate, -1, *x.shape[1:]), batch)

    def body(carry, i):
      grads, loss, accuracy, model_state = carry
      (l, (a, model_state)), g = grad_fn(state.params, model_state,
                                         jax.tree.map(lambda x: x[i], micro),
                                         jax.random.fold_in(rng, i), model)
      return (jax.tree.map(jnp.add, grads, g), loss + l, accuracy + a, model_state), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, loss, accuracy, model_state), _ = jax.lax.scan(
        body, (zeros, 0.0, 0.0, state.model_state), jnp.arange(accumulate))
    grads = jax.tree.map(lambda g: g / accumulate, grads)
    loss, accuracy = loss / accumulate, accuracy / accumulate
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # param_norm is of the updated parameters: the loss lags them by one step, so the trainer
  # checks both before it evaluates or saves them.
  metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads),
             "param_norm": optax.tree.norm(params), "learning_rate": schedule(state.step)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       model_state=model_state), metrics


def eval_step(params, model_state, batch: dict[str, jax.Array], *,
              model: nn.Module) -> dict[str, jax.Array]:
  """Weighted sums over ``batch`` (``weights`` 0 marks padding examples)."""
  logits, _ = _forward(model, params, model_state, batch, train=False)
  logits = logits.astype(jnp.float32)
  weights = batch["weights"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
  return {"loss": jnp.sum(loss * weights), "correct": jnp.sum(correct * weights),
          "count": jnp.sum(weights)}

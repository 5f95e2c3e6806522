"""Pure step functions of the training loop (jitted by the trainer with shardings)."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from effx.training import optim


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint must hold to continue a run bit for bit."""

  step: jax.Array          # int32 []: optimizer steps taken
  params: Any
  opt_state: Any
  model_state: Any         # non-trained collections (e.g. routing centroids), or {}


def train_step(state: TrainState, batch: dict[str, jax.Array], extra: Any = None, *,
               objective, tx: optax.GradientTransformation, schedule: Callable,
               dropout_key: jax.Array, accumulate: int = 1
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step of ``objective`` on ``batch`` (split into ``accumulate``
  micro-batches whose gradients are averaged). ``extra`` is passed to the objective's
  loss untouched (a distillation teacher's variables: no gradient, not donated).
  Dropout keys derive from ``(dropout_key, step)``, so a resumed run draws the same
  masks."""
  rng = jax.random.fold_in(dropout_key, state.step)
  grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
  if accumulate == 1:
    (loss, (values, model_state)), grads = grad_fn(state.params, state.model_state, batch,
                                                   rng, extra)
  else:
    micro = jax.tree.map(lambda x: x.reshape(accumulate, -1, *x.shape[1:]), batch)

    def body(carry, i):
      grads, loss, values, model_state = carry
      (l, (v, model_state)), g = grad_fn(state.params, model_state,
                                         jax.tree.map(lambda x: x[i], micro),
                                         jax.random.fold_in(rng, i), extra)
      return (jax.tree.map(jnp.add, grads, g), loss + l, jax.tree.map(jnp.add, values, v),
              model_state), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    shapes = jax.eval_shape(grad_fn, state.params, state.model_state,
                            jax.tree.map(lambda x: x[0], micro), rng, extra)
    no_values = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes[0][1][0])
    (grads, loss, values, model_state), _ = jax.lax.scan(
        body, (zeros, 0.0, no_values, state.model_state), jnp.arange(accumulate))
    grads = jax.tree.map(lambda g: g / accumulate, grads)
    loss, values = loss / accumulate, jax.tree.map(lambda v: v / accumulate, values)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optim.project_to_bounds(optax.apply_updates(state.params, updates))
  # param_norm is of the updated parameters: the loss lags them by one step, so the trainer
  # checks both before it evaluates or saves them.
  metrics = {"loss": loss, **values, "grad_norm": optax.tree.norm(grads),
             "param_norm": optax.tree.norm(params), "learning_rate": schedule(state.step)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       model_state=model_state), metrics


def eval_step(params, model_state, batch: dict[str, jax.Array], carry: Any = None,
              extra: Any = None, *, objective) -> tuple[dict[str, jax.Array], Any]:
  """The objective's evaluation sums over ``batch`` and its carry for the next batch (a
  language model's segment memory; None for others); ``extra``: a teacher's variables."""
  return objective.eval_sums(params, model_state, batch, carry, extra)

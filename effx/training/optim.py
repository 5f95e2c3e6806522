"""AdamW with the LRA learning-rate schedules and clipping (compression parts such as
pruning wrap it in the run, ``effx.compress.parts``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from effx.attention import registry

SCHEDULES = ("rsqrt", "cosine", "constant")


def schedule(config) -> optax.Schedule:
  """Linear warm-up to ``learning_rate`` over ``warmup_steps``, then ``config.schedule``:
  ``rsqrt`` (``lr * sqrt(warmup / step)``, LRA's text/listops/retrieval), ``cosine``
  (to 0 at ``num_train_steps``, LRA's image/pathfinder) or ``constant``."""
  peak, warmup, total = config.learning_rate, config.warmup_steps, config.num_train_steps
  if config.schedule not in SCHEDULES:
    raise ValueError(f"schedule={config.schedule!r} is not one of {', '.join(SCHEDULES)}")

  def lr(step):
    step = jnp.asarray(step, jnp.float32) + 1.0
    warm = jnp.minimum(1.0, step / max(warmup, 1))
    after = jnp.maximum(step - warmup, 0.0)
    if config.schedule == "rsqrt":
      decay = jnp.sqrt(max(warmup, 1) / jnp.maximum(step, max(warmup, 1)))
    elif config.schedule == "cosine":
      decay = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(after / max(total - warmup, 1), 1.0)))
    else:
      decay = 1.0
    return peak * warm * decay

  return lr


def _decay_mask(params):
  # Decoupled weight decay on matrices only: not on biases, LayerNorm scales or CLS.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def optimizer(config) -> optax.GradientTransformation:
  """The optimizer of a training config (gradients are already averaged over the batch
  and its micro-batches when they arrive here)."""
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(optax.adamw(schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                           weight_decay=config.weight_decay, mask=_decay_mask))
  return optax.chain(*parts)


def project_to_bounds(params, bounds: dict[str, tuple[float, float]] | None = None):
  """``params`` with every parameter named in ``bounds`` (``{name: (low, high)}``; default:
  every family's ``Family.bounds``, e.g. adaptive span's ``span_fraction``) clamped to its
  range: the projection the training step applies after each update, as the paper
  clamps its spans. Others pass unchanged (no optimizer state: checkpoints of runs
  without bounded parameters are as before)."""
  bounds = registry.parameter_bounds() if bounds is None else bounds

  def project(path, p):
    key = path[-1]
    bound = bounds.get(getattr(key, "key", getattr(key, "name", None)))
    return p if bound is None else jnp.clip(p, *bound).astype(p.dtype)

  return jax.tree_util.tree_map_with_path(project, params)

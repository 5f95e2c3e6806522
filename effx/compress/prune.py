"""Magnitude and movement pruning on Zhu & Gupta's schedule, as an optax wrapper.

``config.prune`` (``method="none"``: off). With ``method="magnitude"``, after each
optimizer update the smallest-magnitude weights of the selected parameters are set to
zero; with ``method="movement"`` (Sanh et al. 2020) those with the lowest movement
scores (see ``pruning``). The masks are recomputed every ``update_every`` steps between
``start_step`` and ``end_step`` at the sparsity of Zhu & Gupta's (2017) cubic schedule

    s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_end - t_0))^3,

from ``initial_sparsity`` s_i to ``target_sparsity`` s_f, and held after ``end_step``.
``scope="layer"``: each weight matrix of each layer (a layer-stacked parameter counts
per layer) keeps its own fraction; ``"global"``: one magnitude threshold over all
selected weights. Parameters whose path (``encoder/encoder/layers/.../kernel``) matches
``include`` and not ``exclude`` are pruned: by default every kernel except the output
layer's (biases, norms and embeddings are not kernels). The masks live in the
optimizer state, so a checkpoint holds them and a resumed run continues exactly.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from effx.common import axes, schema
from effx.common.axes import path_name
from effx.compress.part import Part

METHODS = ("none", "magnitude", "movement")
SCOPES = ("layer", "global")
DEFAULTS = dict(method="none", target_sparsity=0.8, initial_sparsity=0.0, start_step=0,
                end_step=0, update_every=100, scope="layer", include=r"kernel$",
                exclude=r"^head/logits/")


def defaults() -> ml_collections.ConfigDict:
  """``config.prune`` at its defaults (off); ``end_step=0`` means 80% of training."""
  return ml_collections.ConfigDict(dict(DEFAULTS))


def window(prune: Any, num_train_steps: int) -> tuple[int, int]:
  """``(start_step, end_step)``, ``end_step=0`` standing for 80% of training."""
  end = prune["end_step"] or int(0.8 * num_train_steps)
  return int(prune["start_step"]), int(end)


def sparsity_at(step, *, initial: float, target: float, start: int, end: int):
  """Zhu & Gupta's cubic schedule at ``step`` (0 before ``start``, ``target`` after
  ``end``)."""
  progress = jnp.clip((jnp.asarray(step, jnp.float32) - start) / max(end - start, 1), 0.0, 1.0)
  value = target + (initial - target) * (1.0 - progress) ** 3
  return jnp.where(jnp.asarray(step) < start, 0.0, value)


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def named_leaves(params) -> list[tuple[str, Any, bool]]:
  """``(path name, leaf, layer-stacked)`` of every parameter; a boxed (logically
  partitioned) parameter is one leaf."""
  return [(path_name(p), leaf, axes.stacked_over_layers(p))
          for p, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0]]


def chosen_names(params, include: str, exclude: str) -> list[str]:
  """Names of the parameters that are pruned."""
  inc, exc = re.compile(include), re.compile(exclude) if exclude else None
  return [name for name, _, _ in named_leaves(params)
          if inc.search(name) and not (exc and exc.search(name))]


def _threshold(values, sparsity):
  """The k-th smallest of ``values`` (k = floor(sparsity * size)); -inf when k = 0."""
  flat = jnp.sort(values.reshape(-1))
  k = jnp.floor(sparsity * flat.size).astype(jnp.int32)
  return jnp.where(k > 0, flat[jnp.maximum(k - 1, 0)], -jnp.inf)


def keep_masks(scores: dict[str, tuple[jax.Array, bool]], sparsity,
               scope: str) -> dict[str, jax.Array]:
  """``{name: bool mask}`` keeping the highest-scoring ``1 - sparsity`` of each weight
  matrix (``scores[name] = (score array, layer-stacked)``; per layer of a stacked one),
  or of all of them together when ``scope="global"`` (everything at or below the cut
  goes)."""
  if scope == "global":
    cut = _threshold(jnp.concatenate([v.reshape(-1) for v, _ in scores.values()]), sparsity)
    return {name: v > cut for name, (v, _) in scores.items()}
  masks = {}
  for name, (v, layered) in scores.items():
    if layered:
      cuts = jax.vmap(lambda m: _threshold(m, sparsity))(v)
      masks[name] = v > cuts.reshape((-1,) + (1,) * (v.ndim - 1))
    else:
      masks[name] = v > _threshold(v, sparsity)
  return masks


def magnitude_masks(params, names: list[str], sparsity, scope: str) -> dict[str, jax.Array]:
  """Masks keeping the largest-magnitude weights (see ``keep_masks``)."""
  return keep_masks({name: (jnp.abs(leaf), layered) for name, leaf, layered
                     in named_leaves(params) if name in names}, sparsity, scope)


class PruneState(NamedTuple):
  count: jax.Array   # int32 []: updates applied
  masks: Any         # {parameter name: bool mask} of the pruned parameters
  scores: Any        # movement: {name: accumulated -grad * weight}; magnitude: {}
  dense: Any         # movement: {name: the weights before masking}; magnitude: {}
  inner: Any


def pruning(inner: optax.GradientTransformation, *, method: str, initial: float,
            target: float, start: int, end: int, update_every: int, scope: str, include: str,
            exclude: str) -> optax.GradientTransformation:
  """Wraps ``inner`` so that its updated parameters are pruned to the schedule.

  ``method="magnitude"``: masks keep the largest weights; a pruned weight is zero and
  stays zero while its mask holds. ``method="movement"`` (Sanh et al. 2020, hard top-k):
  masks keep the highest scores S = -Σ_t ∂L/∂W'·W over the steps so far (W' the masked
  weights the model uses, W the dense ones, kept in the optimizer state): weights moving
  away from zero score high. The masked weights get no loss gradient, and a weight whose
  mask returns continues from its dense value (the straight-through estimator the scores
  need).
  """
  movement = method == "movement"

  def init(params):
    names = chosen_names(params, include, exclude)
    if not names:
      raise ValueError(f"prune.include={include!r} / exclude={exclude!r} select no "
                       "parameter")
    masks, scores, dense = {}, {}, {}
    for name, leaf, _ in named_leaves(params):
      if name not in names:
        continue
      value = leaf.value if _is_box(leaf) else leaf
      like = (lambda x, box=leaf: box.replace_boxed(x)) if _is_box(leaf) else (lambda x: x)
      masks[name] = like(jnp.ones(value.shape, bool))  # a boxed parameter's sharding
      if movement:
        scores[name] = like(jnp.zeros(value.shape, jnp.float32))
        dense[name] = like(value)
    return PruneState(jnp.zeros((), jnp.int32), masks, scores, dense, inner.init(params))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("pruning needs the parameters (optax.apply_updates order)")
    flat, tree = jax.tree_util.tree_flatten_with_path(params)
    grad_leaves = jax.tree.leaves(grads)
    names = [path_name(p) for p, _ in flat]
    scores, dense_params, masked_grads = dict(state.scores), [], []
    for name, (_, leaf), g in zip(names, flat, grad_leaves):
      if movement and name in state.masks:
        scores[name] = state.scores[name] - (g * state.dense[name]).astype(jnp.float32)
        dense_params.append(state.dense[name])
        masked_grads.append(jnp.where(state.masks[name], g, 0).astype(g.dtype))
      else:
        dense_params.append(leaf)
        masked_grads.append(g)
    dense_params = jax.tree.unflatten(tree, dense_params)
    updates, inner_state = inner.update(jax.tree.unflatten(tree, masked_grads), state.inner,
                                        dense_params)
    new_dense = optax.apply_updates(dense_params, updates)
    count = state.count + 1
    refresh = ((count >= start) & ((count - start) % update_every == 0)
               & (count <= end)) | (count == end)
    sparsity = sparsity_at(count, initial=initial, target=target, start=start, end=end)
    names_pruned = list(state.masks)

    def fresh():  # sorting every pruned weight is the costly part: only when refreshing
      if movement:
        stacked = {n: is_stacked for n, _, is_stacked in named_leaves(new_dense)}
        return keep_masks({n: (scores[n], stacked[n]) for n in names_pruned}, sparsity,
                          scope)
      return magnitude_masks(new_dense, names_pruned, sparsity, scope)

    masks = jax.lax.cond(refresh, fresh, lambda: state.masks)
    new_flat = jax.tree_util.tree_flatten_with_path(new_dense)[0]
    dense = {path_name(p): leaf for p, leaf in new_flat if path_name(p) in state.dense}
    pruned = [jnp.where(masks[path_name(p)], leaf, 0).astype(leaf.dtype)
              if path_name(p) in masks else leaf for p, leaf in new_flat]
    pruned = jax.tree.unflatten(tree, pruned)
    updates = jax.tree.map(lambda new, old: (new - old).astype(old.dtype), pruned, params)
    return updates, PruneState(count, masks, scores, dense, inner_state)

  return optax.GradientTransformation(init, update)


def magnitude_pruning(inner: optax.GradientTransformation, **options):
  """``pruning(inner, method="magnitude", ...)``."""
  return pruning(inner, method="magnitude", **options)


class Pruning(Part):
  """``config.prune`` in a run: the optimizer masks its updates, each validation reports
  the sparsity over every pruned weight, ``results.json`` every parameter's, and the
  best checkpoint is chosen once pruning has ended (at its final sparsity)."""

  def __init__(self, section, num_train_steps: int):
    self.section = section
    self.start, self.end = window(section, num_train_steps)

  def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    s = self.section
    return pruning(tx, method=s.method, initial=s.initial_sparsity,
                   target=s.target_sparsity, start=self.start, end=self.end,
                   update_every=s.update_every, scope=s.scope, include=s.include,
                   exclude=s.exclude)

  def best_from(self) -> int:
    return self.end

  def metrics(self, params) -> dict[str, float]:
    return {"sparsity": sparsity(params, self.section.include, self.section.exclude)["all"]}

  def results(self, params) -> dict[str, dict[str, float]]:
    return {"sparsity": sparsity(params, self.section.include, self.section.exclude)}


def sparsity(params, include: str, exclude: str) -> dict[str, float]:
  """Fraction of zeros in each pruned parameter, per layer for stacked ones
  (``name[i]``), and ``"all"`` over every pruned weight. Computed where the parameters
  live (sharded over hosts or not)."""
  names = set(chosen_names(params, include, exclude))
  out, zeros, total = {}, 0.0, 0
  for name, leaf, layered in named_leaves(params):
    if name not in names:
      continue
    if layered:
      per_layer = jnp.mean((leaf == 0).reshape(leaf.shape[0], -1), axis=1)
      out.update({f"{name}[{i}]": float(v) for i, v in enumerate(jax.device_get(per_layer))})
    else:
      out[name] = float(jnp.mean(leaf == 0))
    zeros += float(jnp.sum(leaf == 0))
    total += leaf.size
  out["all"] = zeros / max(total, 1)
  return out


def check(section: Mapping[str, Any], num_train_steps: int) -> None:
  """``config.prune``: keys, types, and values that cannot work."""
  schema.check_section("prune", section, DEFAULTS)
  values = {**DEFAULTS, **dict(section)}
  for key, choices in (("method", METHODS), ("scope", SCOPES)):
    if values[key] not in choices:
      raise ValueError(f"prune.{key}={values[key]!r}; one of {', '.join(choices)}")
  for key in ("target_sparsity", "initial_sparsity"):
    if not 0.0 <= values[key] < 1.0:
      raise ValueError(f"prune.{key}={values[key]} must be in [0, 1)")
  schema.check_regexes("prune", values, ("include", "exclude"))
  if values["update_every"] <= 0:
    raise ValueError(f"prune.update_every={values['update_every']} must be positive")
  if values["method"] != "none":
    start, end = window(values, num_train_steps)
    if not 0 <= start < end <= num_train_steps:
      raise ValueError(f"prune.start_step={start} and end_step={end} must satisfy "
                       f"0 <= start_step < end_step <= num_train_steps={num_train_steps}")

"""Magnitude pruning on Zhu & Gupta's schedule, as an optax wrapper.

``config.prune`` (``method="none"``: off). With ``method="magnitude"``, after each
optimizer update the smallest-magnitude weights of the selected parameters are set to
zero; the masks are recomputed every ``update_every`` steps between ``start_step`` and
``end_step`` at the sparsity of Zhu & Gupta's (2017) cubic schedule

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
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

METHODS = ("none", "magnitude")
SCOPES = ("layer", "global")
DEFAULTS = dict(method="none", target_sparsity=0.8, initial_sparsity=0.0, start_step=0,
                end_step=0, update_every=100, scope="layer", include=r"kernel$",
                exclude=r"^head/logits/")


def defaults() -> ml_collections.ConfigDict:
  """``config.prune`` at its defaults (off); ``end_step=0`` means 80% of training."""
  return ml_collections.ConfigDict(dict(DEFAULTS))


def check_config(prune: Any, num_train_steps: int) -> None:
  """Unknown keys, wrong types and bad values of ``config.prune`` raise, naming the key."""
  values = dict(prune)
  unknown = sorted(set(values) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"unknown config key(s) {', '.join('prune.' + k for k in unknown)}; "
                     f"valid: {', '.join(DEFAULTS)}")
  for key, default in DEFAULTS.items():
    value = values.get(key, default)
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          if isinstance(default, float) else isinstance(value, type(default))
          and not (isinstance(value, bool) and not isinstance(default, bool)))
    if not ok:
      raise TypeError(f"prune.{key}={value!r} must be a {type(default).__name__}")
  if values.get("method", "none") not in METHODS:
    raise ValueError(f"prune.method={values['method']!r}; one of {', '.join(METHODS)}")
  if values.get("scope", "layer") not in SCOPES:
    raise ValueError(f"prune.scope={values['scope']!r}; one of {', '.join(SCOPES)}")
  for key in ("target_sparsity", "initial_sparsity"):
    if not 0.0 <= values.get(key, 0.0) < 1.0:
      raise ValueError(f"prune.{key}={values[key]} must be in [0, 1)")
  for key in ("include", "exclude"):
    try:
      re.compile(values.get(key, ""))
    except re.error as error:
      raise ValueError(f"prune.{key}={values[key]!r} is not a regular expression: "
                       f"{error}") from None
  if values.get("update_every", 1) <= 0:
    raise ValueError(f"prune.update_every={values['update_every']} must be positive")
  if values.get("method", "none") != "none":
    start, end = window(values, num_train_steps)
    if not 0 <= start < end <= num_train_steps:
      raise ValueError(f"prune.start_step={start} and end_step={end} must satisfy "
                       f"0 <= start_step < end_step <= num_train_steps={num_train_steps}")


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


def path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def named_leaves(params) -> list[tuple[str, Any, bool]]:
  """``(path name, leaf, layer-stacked)`` of every parameter; a boxed (logically
  partitioned) parameter is one leaf."""
  return [(path_name(p), leaf, any(getattr(k, "key", None) == "layers" for k in p))
          for p, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0]]


def chosen_names(params, include: str, exclude: str) -> list[str]:
  """Names of the parameters that are pruned."""
  inc, exc = re.compile(include), re.compile(exclude) if exclude else None
  return [name for name, _, _ in named_leaves(params)
          if inc.search(name) and not (exc and exc.search(name))]


def _threshold(values, sparsity):
  """The k-th smallest of ``values`` (k = floor(sparsity * size)); -1 when k = 0."""
  flat = jnp.sort(values.reshape(-1))
  k = jnp.floor(sparsity * flat.size).astype(jnp.int32)
  return jnp.where(k > 0, flat[jnp.maximum(k - 1, 0)], -1.0)


def keep_masks(params, names: list[str], sparsity, scope: str) -> dict[str, jax.Array]:
  """``{name: bool mask}`` keeping the largest-magnitude ``1 - sparsity`` of each named
  weight matrix (per layer of a layer-stacked one), or of all of them together when
  ``scope="global"`` (everything at or below the cut goes)."""
  leaves = {name: (leaf, layered) for name, leaf, layered in named_leaves(params)
            if name in names}
  if scope == "global":
    cut = _threshold(jnp.concatenate([jnp.abs(leaf).reshape(-1)
                                      for leaf, _ in leaves.values()]), sparsity)
    return {name: jnp.abs(leaf) > cut for name, (leaf, _) in leaves.items()}
  masks = {}
  for name, (leaf, layered) in leaves.items():
    magnitude = jnp.abs(leaf)
    if layered:
      cuts = jax.vmap(lambda m: _threshold(m, sparsity))(magnitude)
      masks[name] = magnitude > cuts.reshape((-1,) + (1,) * (leaf.ndim - 1))
    else:
      masks[name] = magnitude > _threshold(magnitude, sparsity)
  return masks


class PruneState(NamedTuple):
  count: jax.Array   # int32 []: updates applied
  masks: Any         # {parameter name: bool mask} of the pruned parameters
  inner: Any


def magnitude_pruning(inner: optax.GradientTransformation, *, initial: float, target: float,
                      start: int, end: int, update_every: int, scope: str, include: str,
                      exclude: str) -> optax.GradientTransformation:
  """Wraps ``inner`` so that its updated parameters are pruned to the schedule."""

  def init(params):
    names = chosen_names(params, include, exclude)
    if not names:
      raise ValueError(f"prune.include={include!r} / exclude={exclude!r} select no "
                       "parameter")
    masks = {}
    for name, leaf, _ in named_leaves(params):
      if name in names:  # a boxed parameter's mask shares its sharding
        masks[name] = (leaf.replace_boxed(jnp.ones(leaf.value.shape, bool)) if _is_box(leaf)
                       else jnp.ones(leaf.shape, bool))
    return PruneState(jnp.zeros((), jnp.int32), masks, inner.init(params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("magnitude pruning needs the parameters (optax.apply_updates order)")
    updates, inner_state = inner.update(updates, state.inner, params)
    new_params = optax.apply_updates(params, updates)
    count = state.count + 1
    refresh = ((count >= start) & ((count - start) % update_every == 0)
               & (count <= end)) | (count == end)
    sparsity = sparsity_at(count, initial=initial, target=target, start=start, end=end)
    # Sorting every pruned weight is the costly part: only on the steps that refresh.
    masks = jax.lax.cond(refresh, lambda: keep_masks(new_params, list(state.masks), sparsity,
                                                     scope), lambda: state.masks)
    flat, tree = jax.tree_util.tree_flatten_with_path(new_params)
    pruned = [jnp.where(masks[path_name(p)], leaf, 0).astype(leaf.dtype)
              if path_name(p) in masks else leaf for p, leaf in flat]
    pruned = jax.tree.unflatten(tree, pruned)
    updates = jax.tree.map(lambda new, old: (new - old).astype(old.dtype), pruned, params)
    return updates, PruneState(count, masks, inner_state)

  return optax.GradientTransformation(init, update)


def wrap(tx: optax.GradientTransformation, config) -> optax.GradientTransformation:
  """``tx`` with ``config.prune`` applied (unchanged when the method is ``"none"``)."""
  prune = config.prune
  if prune.method == "none":
    return tx
  start, end = window(prune, config.num_train_steps)
  return magnitude_pruning(tx, initial=prune.initial_sparsity, target=prune.target_sparsity,
                           start=start, end=end, update_every=prune.update_every,
                           scope=prune.scope, include=prune.include, exclude=prune.exclude)


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

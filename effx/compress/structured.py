"""Attention-head and feed-forward-unit pruning by importance, exported as a smaller model.

Importance (Michel et al. 2019): put a gate ξ on each head's output (on each hidden unit
of the feed-forward block) and score it by the mean over batches of |∂L/∂ξ| at ξ = 1.
No gate has to be added to the model: scaling head h's output scales the rows
``out/kernel[h]`` of the output projection, so ∂L/∂ξ_h = Σ out_kernel[h] · ∂L/∂out_kernel[h]
(and for unit i, Σ wo[i] · ∂L/∂wo[i]).

Every layer keeps the same number of heads and units (the layers are one stacked scan),
each layer its own most important ones. ``shrink`` removes the others from the
parameters: the result is a model with ``num_heads = heads kept``, ``qkv_dim = heads
kept × head dim`` and ``mlp_dim = units kept`` whose outputs equal those of the original
with the removed heads' and units' output rows zeroed (``masked``).

``effx.training.exports.shrink_workdir`` (``python -m effx.structured``) writes the
result as a workdir.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ATTENTION = ("encoder", "encoder", "layers", "block", "attention_block", "attention")
MLP = ("encoder", "encoder", "layers", "block", "mlp_block", "feed_forward", "mlp")
# Families whose heads are independent and alike, with dense attention's parameters:
# removing heads leaves the other heads' outputs unchanged.
EXPORTABLE = ("dense", "blockwise", "local", "sparse", "longformer", "linear", "cosformer")


def _get(params, path):
  for key in path:
    params = params[key]
  return params


def _with(params, path, value):
  """A copy of ``params`` (nested dicts) with ``path`` replaced by ``value``."""
  if not path:
    return value
  out = dict(params)
  out[path[0]] = _with(params[path[0]], path[1:], value)
  return out


def check_exportable(model_config) -> None:
  if model_config.kind != "classifier" or model_config.reversible:
    raise ValueError("head / unit pruning supports model.kind='classifier' without "
                     f"reversible layers (this model: kind={model_config.kind!r}, "
                     f"reversible={model_config.reversible})")
  if model_config.attention not in EXPORTABLE:
    raise ValueError(f"head pruning of model.attention={model_config.attention!r} is not "
                     f"supported: its heads are not independent or it has parameters of its "
                     f"own; supported: {', '.join(EXPORTABLE)}")


def importance(loss_fn, params, batches) -> tuple[np.ndarray, np.ndarray]:
  """``(heads [layers, num_heads], units [layers, mlp_dim])``: mean |∂L/∂ξ| over
  ``batches`` of ``loss_fn(params, batch)``."""
  grad_fn = jax.jit(jax.grad(loss_fn))
  heads = units = 0.0
  count = 0
  for batch in batches:
    grads = grad_fn(params, batch)
    out, g_out = _get(params, ATTENTION)["out"]["kernel"], _get(grads, ATTENTION)["out"]["kernel"]
    wo, g_wo = _get(params, MLP)["wo"]["kernel"], _get(grads, MLP)["wo"]["kernel"]
    heads = heads + jnp.abs(jnp.sum(out * g_out, axis=(2, 3)))   # [layers, heads]
    units = units + jnp.abs(jnp.sum(wo * g_wo, axis=2))          # [layers, units]
    count += 1
  if not count:
    raise ValueError("importance needs at least one batch")
  return np.asarray(heads) / count, np.asarray(units) / count


def keep_top(scores: np.ndarray, keep: int) -> np.ndarray:
  """``[layers, keep]``: each layer's ``keep`` highest scores, indices in ascending order."""
  if not 1 <= keep <= scores.shape[1]:
    raise ValueError(f"cannot keep {keep} of {scores.shape[1]} per layer")
  order = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
  return np.sort(order, axis=1)


def _take(x, index, axis):
  """Per-layer gather: ``x[l]`` keeps ``index[l]`` along ``axis`` (counted with the layer
  axis included)."""
  shape = [1] * x.ndim
  shape[0], shape[axis] = index.shape[0], index.shape[1]
  return jnp.take_along_axis(x, jnp.asarray(index).reshape(shape), axis=axis)


def shrink(params, heads: np.ndarray | None, units: np.ndarray | None):
  """``params`` with only the kept heads (``[layers, k]`` indices) and feed-forward units
  (``[layers, m]``)."""
  if heads is not None:
    attention = dict(_get(params, ATTENTION))
    for name in ("query", "key", "value"):
      attention[name] = {"kernel": _take(attention[name]["kernel"], heads, 2),
                         "bias": _take(attention[name]["bias"], heads, 1)}
    attention["out"] = {"kernel": _take(attention["out"]["kernel"], heads, 1),
                        "bias": attention["out"]["bias"]}
    params = _with(params, ATTENTION, attention)
  if units is not None:
    mlp = dict(_get(params, MLP))
    mlp["wi"] = {"kernel": _take(mlp["wi"]["kernel"], units, 2),
                 "bias": _take(mlp["wi"]["bias"], units, 1)}
    mlp["wo"] = {"kernel": _take(mlp["wo"]["kernel"], units, 1), "bias": mlp["wo"]["bias"]}
    params = _with(params, MLP, mlp)
  return params


def masked(params, heads: np.ndarray | None, units: np.ndarray | None):
  """``params`` of the original size with the output rows of every removed head and unit
  zeroed: the model ``shrink`` exports computes the same outputs."""
  if heads is not None:
    out = _get(params, ATTENTION)["out"]
    keep = np.zeros(out["kernel"].shape[:2], bool)
    np.put_along_axis(keep, heads, True, axis=1)
    kernel = out["kernel"] * jnp.asarray(keep)[:, :, None, None]
    params = _with(params, ATTENTION + ("out",), {**out, "kernel": kernel})
  if units is not None:
    wo = _get(params, MLP)["wo"]
    keep = np.zeros(wo["kernel"].shape[:2], bool)
    np.put_along_axis(keep, units, True, axis=1)
    params = _with(params, MLP + ("wo",),
                   {**wo, "kernel": wo["kernel"] * jnp.asarray(keep)[:, :, None]})
  return params

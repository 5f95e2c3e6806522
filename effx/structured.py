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

  python -m effx.structured --workdir=W --out=W_small --heads=2 --mlp_units=64

writes a workdir that ``effx.evaluate`` evaluates and ``--config.init_checkpoint`` can
start a fine-tuning run from.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

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


def export(workdir: str, out: str, *, heads: int | None = None, mlp_units: int | None = None,
           batches: int = 8, checkpoint: str = "best") -> dict[str, Any]:
  """Scores ``workdir``'s heads and units on ``batches`` training batches, keeps the
  ``heads`` / ``mlp_units`` most important per layer, and writes the smaller model as a
  new workdir ``out`` (config, checkpoint, best, ``structure.json``). Returns the
  summary written to ``structure.json``."""
  from effx import checkpoint as ckpt  # noqa: PLC0415 (the trainer imports this package)
  from effx import distill as distill_lib  # noqa: PLC0415
  from effx import evaluate as evaluate_lib  # noqa: PLC0415
  from effx import prune as prune_lib  # noqa: PLC0415
  from effx import trainer  # noqa: PLC0415
  from effx import workdir as workdir_lib  # noqa: PLC0415
  from effx.data import pipeline  # noqa: PLC0415
  from effx.objectives import forward  # noqa: PLC0415

  if heads is None and mlp_units is None:
    raise ValueError("give --heads and/or --mlp_units (how many to keep per layer)")
  if os.path.exists(out):
    raise FileExistsError(f"--out={out} exists; the export writes a new workdir")
  run, params, _, step = evaluate_lib.restore(workdir, checkpoint)
  config = run.config
  if config.quant.mode != "none":
    raise ValueError(f"--workdir={workdir} is quantized (quant.mode={config.quant.mode!r}); "
                     "prune heads and units of the float run, then quantize")
  check_exportable(run.model_config)
  params = jax.device_get(params)

  def loss(p, batch):
    logits, _, _ = forward(run.model, p, {}, batch, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["targets"]).mean()

  dataset = pipeline.train_dataset(run.task.splits["train"], config.batch_size, config.seed)
  iterator = pipeline.train_iterator(dataset, None, threads=config.data_threads)
  head_scores, unit_scores = importance(
      loss, params, [{k: jnp.asarray(v) for k, v in next(iterator).items()}
                     for _ in range(batches)])
  cfg = run.model_config
  kept_heads = keep_top(head_scores, heads) if heads is not None else None
  kept_units = keep_top(unit_scores, mlp_units) if mlp_units is not None else None
  small = shrink(params, kept_heads, kept_units)

  new = config.copy_and_resolve_references()
  with new.unlocked():
    head_dim = cfg.qkv_dim // cfg.num_heads
    if heads is not None:
      new.model.num_heads, new.model.qkv_dim = heads, heads * head_dim
    if mlp_units is not None:
      new.model.mlp_dim = mlp_units
    new.model.classifier_dim = cfg.classifier_dim or cfg.mlp_dim  # the head keeps its width
    new.prune, new.distill = prune_lib.defaults(), distill_lib.defaults()  # done with both
  small_run = trainer.Run(new, evaluation_only=True)
  state = small_run.init_state()
  state = state.replace(params=jax.device_put(small, small_run.state_shardings.params),
                        step=jnp.asarray(step, jnp.int32))
  os.makedirs(out)
  workdir_lib.write_json_atomic(os.path.join(out, "config.json"),
                                json.loads(new.to_json_best_effort()))
  saver = ckpt.Checkpoints(out, 1, asynchronous=False)
  saver.save_best(step, {"params": state.params, "model_state": state.model_state})
  saver.save(step, state, {}, {"best_value": None, "best_step": step})
  saver.close()
  count = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))  # noqa: E731
  summary = {
      "source": os.path.abspath(workdir), "checkpoint": checkpoint, "step": int(step),
      "batches": batches, "num_heads": [cfg.num_heads, heads or cfg.num_heads],
      "mlp_dim": [cfg.mlp_dim, mlp_units or cfg.mlp_dim],
      "parameters": [count(params), count(small)],
      "kept_heads": None if kept_heads is None else kept_heads.tolist(),
      "kept_units": None if kept_units is None else kept_units.tolist(),
      "head_importance": head_scores.tolist(),
  }
  workdir_lib.write_json_atomic(os.path.join(out, "structure.json"), summary)
  return summary


def main(argv):
  del argv
  from absl import flags  # noqa: PLC0415

  from effx import cli  # noqa: PLC0415

  f = flags.FLAGS
  cli.quiet_libraries()
  summary = cli.user_errors_in_one_line(export)(
      f.workdir, f.out, heads=f.heads, mlp_units=f.mlp_units, batches=f.batches,
      checkpoint=f.checkpoint)
  print(f"{f.out}: heads {summary['num_heads'][0]} -> {summary['num_heads'][1]}, "
        f"mlp {summary['mlp_dim'][0]} -> {summary['mlp_dim'][1]}, parameters "
        f"{summary['parameters'][0]} -> {summary['parameters'][1]}")


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("workdir", None, "a finished effx.train workdir", required=True)
  flags.DEFINE_string("out", None, "the new (smaller) workdir", required=True)
  flags.DEFINE_integer("heads", None, "attention heads to keep per layer")
  flags.DEFINE_integer("mlp_units", None, "feed-forward hidden units to keep per layer")
  flags.DEFINE_integer("batches", 8, "training batches to score importance on")
  flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "which checkpoint to prune")
  app.run(main)

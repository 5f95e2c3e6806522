"""A finished run written out as a new, smaller workdir that evaluates like any other.

* ``quantize_workdir``: the best parameters as integers and scales
  (``python -m effx.quantize``; ``effx.compress.quant``).
* ``shrink_workdir``: the least important attention heads and feed-forward units cut
  out (``python -m effx.structured``; ``effx.compress.structured``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from effx.compress import distill, prune, quant, structured
from effx.data import pipeline
from effx.training import checkpoint as ckpt
from effx.training import defaults, restore, validate
from effx.training import workdir as workdir_lib
from effx.training.objectives import forward
from effx.training.run import Run


def quantize_workdir(workdir: str, out: str, *, weight_qtype: str | None = None,
           act_qtype: str | None = None, tile_size: int | None = None) -> dict[str, Any]:
  """Quantizes ``workdir``'s best parameters into the new workdir ``out``; returns the
  summary written to ``out/quantization.json``. A float run takes ``weight_qtype``,
  ``act_qtype`` and ``tile_size`` (None: ``config.quant``'s defaults, int8 / int8 /
  per channel); a QAT run keeps its own and refuses them."""
  if not os.path.isdir(workdir) or not os.path.exists(os.path.join(workdir, "config.json")):
    raise FileNotFoundError(f"--workdir={workdir}: not an effx.train workdir (no "
                            "config.json)")
  if os.path.exists(out):
    raise FileExistsError(f"--out={out} exists; the export writes a new workdir")
  config = defaults.load_workdir_config(workdir)
  if config.quant.mode == "int":
    raise ValueError(f"--workdir={workdir} is already an integer export")
  run, params, model_state, step = restore.restore(workdir, "best")
  given = {k: v for k, v in (("weight_qtype", weight_qtype), ("act_qtype", act_qtype),
                             ("tile_size", tile_size)) if v is not None}
  if config.quant.mode == "qat" and given:
    raise ValueError(f"--workdir={workdir} was trained with quantization-aware training, "
                     f"whose settings the export keeps; drop {', '.join('--' + k for k in given)}")
  new = config.copy_and_resolve_references()
  new.quant.update(given)
  new.quant.mode = "int"
  validate.config(new)
  int_run = Run(new, evaluation_only=True)
  quantized = quant.quantize_params(jax.device_get(params),
                                    nn.unbox(int_run.abstract_state.params))
  os.makedirs(out)
  workdir_lib.write_json_atomic(os.path.join(out, "config.json"),
                                json.loads(new.to_json_best_effort()))
  saver = ckpt.Checkpoints(out, 1, asynchronous=False)
  saver.save_best(step, {"params": quantized, "model_state": model_state})
  saver.close()
  summary = {
      "source": os.path.abspath(workdir), "step": step,
      "weight_qtype": new.quant.weight_qtype, "act_qtype": new.quant.act_qtype,
      "tile_size": new.quant.tile_size, "include": new.quant.include,
      "exclude": new.quant.exclude,
      "bytes": [quant.size_bytes(params), quant.size_bytes(quantized)],
  }
  workdir_lib.write_json_atomic(os.path.join(out, "quantization.json"), summary)
  del run
  return summary


def shrink_workdir(workdir: str, out: str, *, heads: int | None = None, mlp_units: int | None = None,
           batches: int = 8, checkpoint: str = "best") -> dict[str, Any]:
  """Scores ``workdir``'s heads and units on ``batches`` training batches, keeps the
  ``heads`` / ``mlp_units`` most important per layer, and writes the smaller model as a
  new workdir ``out`` (config, checkpoint, best, ``structure.json``). Returns the
  summary written to ``structure.json``."""
  if heads is None and mlp_units is None:
    raise ValueError("give --heads and/or --mlp_units (how many to keep per layer)")
  if os.path.exists(out):
    raise FileExistsError(f"--out={out} exists; the export writes a new workdir")
  run, params, _, step = restore.restore(workdir, checkpoint)
  config = run.config
  if config.quant.mode != "none":
    raise ValueError(f"--workdir={workdir} is quantized (quant.mode={config.quant.mode!r}); "
                     "prune heads and units of the float run, then quantize")
  structured.check_exportable(run.model_config)
  params = jax.device_get(params)

  def loss(p, batch):
    logits, _, _ = forward(run.model, p, {}, batch, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["targets"]).mean()

  dataset = pipeline.train_dataset(run.task.splits["train"], config.batch_size, config.seed)
  iterator = pipeline.train_iterator(dataset, None, threads=config.data_threads)
  head_scores, unit_scores = structured.importance(
      loss, params, [{k: jnp.asarray(v) for k, v in next(iterator).items()}
                     for _ in range(batches)])
  cfg = run.model_config
  kept_heads = structured.keep_top(head_scores, heads) if heads is not None else None
  kept_units = structured.keep_top(unit_scores, mlp_units) if mlp_units is not None else None
  small = structured.shrink(params, kept_heads, kept_units)

  new = config.copy_and_resolve_references()
  with new.unlocked():
    head_dim = cfg.qkv_dim // cfg.num_heads
    if heads is not None:
      new.model.num_heads, new.model.qkv_dim = heads, heads * head_dim
    if mlp_units is not None:
      new.model.mlp_dim = mlp_units
    new.model.classifier_dim = cfg.classifier_dim or cfg.mlp_dim  # the head keeps its width
    new.prune, new.distill = prune.defaults(), distill.defaults()  # done with both
  small_run = Run(new, evaluation_only=True)
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

"""Export a finished run as integers and scales (post-training quantization with qwix).

  python -m effx.quantize --workdir=/tmp/listops --out=/tmp/listops_int8
  python -m effx.evaluate --workdir=/tmp/listops_int8 --split=test

Reads the best checkpoint of a float or quantization-aware (``quant.mode="qat"``) run and
writes a new workdir ``--out`` whose config has ``quant.mode="int"`` and whose best
checkpoint holds the quantized parameters (integer values and float scales; no float
copy of the quantized weights), plus ``quantization.json`` with the sizes (from bit
widths) before and after. A QAT run keeps its own quantization settings; a float run
takes ``--weight_qtype``, ``--act_qtype`` and ``--tile_size``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax


def export(workdir: str, out: str, *, weight_qtype: str | None = None,
           act_qtype: str | None = None, tile_size: int | None = None) -> dict[str, Any]:
  """Quantizes ``workdir``'s best parameters into the new workdir ``out``; returns the
  summary written to ``out/quantization.json``. A float run takes ``weight_qtype``,
  ``act_qtype`` and ``tile_size`` (None: ``config.quant``'s defaults, int8 / int8 /
  per channel); a QAT run keeps its own and refuses them."""
  from effx import checkpoint as ckpt  # noqa: PLC0415
  from effx import evaluate, quant, trainer, validate  # noqa: PLC0415
  from effx import workdir as workdir_lib  # noqa: PLC0415

  if not os.path.isdir(workdir) or not os.path.exists(os.path.join(workdir, "config.json")):
    raise FileNotFoundError(f"--workdir={workdir}: not an effx.train workdir (no "
                            "config.json)")
  if os.path.exists(out):
    raise FileExistsError(f"--out={out} exists; the export writes a new workdir")
  config = trainer.load_workdir_config(workdir)
  if config.quant.mode == "int":
    raise ValueError(f"--workdir={workdir} is already an integer export")
  run, params, model_state, step = evaluate.restore(workdir, "best")
  given = {k: v for k, v in (("weight_qtype", weight_qtype), ("act_qtype", act_qtype),
                             ("tile_size", tile_size)) if v is not None}
  if config.quant.mode == "qat" and given:
    raise ValueError(f"--workdir={workdir} was trained with quantization-aware training, "
                     f"whose settings the export keeps; drop {', '.join('--' + k for k in given)}")
  new = config.copy_and_resolve_references()
  new.quant.update(given)
  new.quant.mode = "int"
  validate.config(new)
  int_run = trainer.Run(new, evaluation_only=True)
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


def main(argv):
  del argv
  from absl import flags  # noqa: PLC0415

  from effx import cli  # noqa: PLC0415

  f = flags.FLAGS
  cli.quiet_libraries()
  summary = cli.user_errors_in_one_line(export)(
      f.workdir, f.out, weight_qtype=f.weight_qtype, act_qtype=f.act_qtype,
      tile_size=f.tile_size)
  before, after = summary["bytes"]
  print(f"{f.out}: weights {summary['weight_qtype']}, activations {summary['act_qtype']}; "
        f"parameters {before:,} -> {after:,} bytes ({after / before:.1%})")


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("workdir", None, "a finished effx.train workdir", required=True)
  flags.DEFINE_string("out", None, "the new (integer) workdir", required=True)
  flags.DEFINE_enum("weight_qtype", None, ["int8", "int4"],
                    "weights of a float run (default int8)")
  flags.DEFINE_enum("act_qtype", None, ["int8", "none"],
                    "activations of a float run (default int8)")
  flags.DEFINE_integer("tile_size", None,
                       "sub-channel tile of a float run (default 0: per channel)")
  app.run(main)

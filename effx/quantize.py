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

from absl import flags

from effx import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "a finished effx.train workdir", required=True)
  flags.DEFINE_string("out", None, "the new (integer) workdir", required=True)
  flags.DEFINE_enum("weight_qtype", None, ["int8", "int4"],
                    "weights of a float run (default int8)")
  flags.DEFINE_enum("act_qtype", None, ["int8", "none"],
                    "activations of a float run (default int8)")
  flags.DEFINE_integer("tile_size", None,
                       "sub-channel tile of a float run (default 0: per channel)")


def main() -> None:
  from effx.training import exports  # noqa: PLC0415 (jax: not needed by --help)

  summary = exports.quantize_workdir(FLAGS.workdir, FLAGS.out,
                                     weight_qtype=FLAGS.weight_qtype,
                                     act_qtype=FLAGS.act_qtype, tile_size=FLAGS.tile_size)
  before, after = summary["bytes"]
  print(f"{FLAGS.out}: weights {summary['weight_qtype']}, activations "
        f"{summary['act_qtype']}; parameters {before:,} -> {after:,} bytes "
        f"({after / before:.1%})")


if __name__ == "__main__":
  cli.run(define_flags, main)

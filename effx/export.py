"""Export a trained model as a deployable artifact (``effx.training.deploy``).

  python -m effx.export --workdir=/tmp/listops --out=/tmp/listops_stablehlo \\
      [--format=stablehlo|onnx] [--checkpoint=best|latest|STEP] [--batch=N|dynamic] \\
      [--length=L|dynamic] [--platforms=cpu,cuda] [--int8=none|dynamic|static] \\
      [--calibration_examples=N] [--overwrite]

Writes ``--out/model.stablehlo`` (the inference forward with its parameters, serialized
by ``jax.export``: any JAX process calls it without effx) or ``--out/model.onnx`` (for
ONNX Runtime; float32, or int8 by ORT's dynamic or static quantization), and
``manifest.json``.
"""

from __future__ import annotations


from absl import flags

from effx import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "an effx.train workdir", required=True)
  flags.DEFINE_string("out", None, "the artifact's folder (must not exist)", required=True)
  flags.DEFINE_string("format", "stablehlo", "stablehlo or onnx")
  flags.DEFINE_string("checkpoint", "best", "best, latest or a step")
  flags.DEFINE_string("batch", "dynamic", "a batch size, or dynamic (any batch)")
  flags.DEFINE_string("length", None, "a length, or dynamic (any up to the model's); "
                      "default: the model's")
  flags.DEFINE_list("platforms", ["cpu"], "lower for these: cpu, cuda, rocm, tpu")
  flags.DEFINE_string("int8", "none", "ONNX only: none, dynamic (ORT quantize_dynamic) or "
                      "static (ORT quantize_static, QDQ, calibrated on training examples)")
  flags.DEFINE_integer("calibration_examples", 256, "--int8=static: how many training "
                       "examples calibrate the activation ranges")
  flags.DEFINE_bool("overwrite", False, "replace an existing --out (once the new artifact "
                    "is complete)")


def main() -> None:
  from effx.training import deploy  # noqa: PLC0415 (jax: not needed by --help)

  manifest = deploy.export_workdir(
      FLAGS.workdir, FLAGS.out, format=FLAGS.format, checkpoint=FLAGS.checkpoint,
      batch=FLAGS.batch, length=FLAGS.length, platforms=tuple(FLAGS.platforms),
      int8=FLAGS.int8, calibration_examples=FLAGS.calibration_examples,
      overwrite=FLAGS.overwrite)
  shapes = "; ".join(f"{x['name']} {x['dtype']}[{', '.join(x['shape'])}]"
                     for x in manifest["inputs"] + manifest["outputs"])
  int8 = f", int8 {manifest['int8']}" if manifest.get("int8", "none") != "none" else ""
  check = manifest.get("check")
  checked = (f"; equals effx's forward to {check['float_max_relative_error']:.1e} (float"
             + (f"), {check['int8_max_relative_error']:.1e} (int8" if "int8_max_relative_error"
                in check else "") + ", relative)") if check else ""
  print(f"{FLAGS.out}/{manifest['file']}: {manifest['kind']} ({manifest['attention']}), "
        f"step {manifest['step']}, for {','.join(manifest['platforms'])}{int8}: {shapes}"
        f"{checked}")


def run(argv=None) -> int:
  """Runs the export command on ``argv`` (default: the command line); returns its exit
  status."""
  return cli.run(define_flags, main, argv)


if __name__ == "__main__":
  run()

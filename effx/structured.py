"""Prune whole attention heads and feed-forward units of a finished run by importance,
and write the smaller model as a new workdir (``effx.compress.structured``).

  python -m effx.structured --workdir=W --out=W_small --heads=2 --mlp_units=64

writes a workdir that ``effx.evaluate`` evaluates and ``--config.init_checkpoint`` can
start a fine-tuning run from.
"""

from __future__ import annotations

from absl import flags

from effx import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "a finished effx.train workdir", required=True)
  flags.DEFINE_string("out", None, "the new (smaller) workdir", required=True)
  flags.DEFINE_integer("heads", None, "attention heads to keep per layer")
  flags.DEFINE_integer("mlp_units", None, "feed-forward hidden units to keep per layer")
  flags.DEFINE_integer("batches", 8, "training batches to score importance on")
  flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "which checkpoint to prune")


def main() -> None:
  from effx.training import exports  # noqa: PLC0415 (jax: not needed by --help)

  summary = exports.shrink_workdir(FLAGS.workdir, FLAGS.out, heads=FLAGS.heads,
                                   mlp_units=FLAGS.mlp_units, batches=FLAGS.batches,
                                   checkpoint=FLAGS.checkpoint)
  print(f"{FLAGS.out}: heads {summary['num_heads'][0]} -> {summary['num_heads'][1]}, "
        f"mlp {summary['mlp_dim'][0]} -> {summary['mlp_dim'][1]}, parameters "
        f"{summary['parameters'][0]} -> {summary['parameters'][1]}")


if __name__ == "__main__":
  cli.run(define_flags, main)

"""Evaluate a checkpoint of a training run.

  python -m effx.evaluate --workdir=/tmp/listops [--split=test] [--checkpoint=latest]

``--checkpoint``: ``latest`` (default: the newest checkpoint that restores), ``best``
(the best-on-validation parameters) or a step number. Prints the accuracy with the
checkpoint it used and writes ``workdir/eval_<split>_<checkpoint>_<step>.json``.
"""

from __future__ import annotations

from absl import flags, logging

from effx import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "an effx.train workdir", required=True)
  flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "split to evaluate")
  flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' or a step number")


def main() -> None:
  from effx.common import lock  # noqa: PLC0415 (with the rest)
  from effx.training import restore  # noqa: PLC0415 (jax: not needed by --help)

  # It writes its result into the workdir: not while a run is using it.
  with lock.workdir_lock(FLAGS.workdir, "effx.evaluate", create=False):
    result = restore.evaluate_workdir(FLAGS.workdir, FLAGS.split, FLAGS.checkpoint)
  logging.info("%s", result)
  print(f"{result['checkpoint']} checkpoint (step {result['step']}), {result['split']}: "
        f"accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f}")


if __name__ == "__main__":
  cli.run(define_flags, main)

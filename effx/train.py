"""Train and evaluate on an LRA task from a config file.

  python -m effx.train --config=configs/lra_listops.py:small --workdir=/tmp/listops \\
      [--config.model.attention=performer --config.model.attention_kwargs.num_features=128]

Rerunning the same command resumes from the newest checkpoint in ``--workdir`` (a
workdir holds one run: a config that would change its results is refused). Ctrl-C or
SIGTERM checkpoints the current step and exits. User errors print one line
(``EFFX_TRACEBACK=1`` shows the traceback).
Multi-host: pass ``--coordinator_address``, ``--num_processes`` and ``--process_id``
(or nothing on a TPU pod, where ``jax.distributed`` finds them itself with
``--distributed``).
"""

from __future__ import annotations

import sys

from absl import app, flags

from effx import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "config file, optionally with an argument: "
                    "configs/lra_text.py:tiny", required=True)
flags.DEFINE_string("workdir", None, "checkpoints, metrics and results go here",
                    required=True)
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host)")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
flags.DEFINE_integer("process_id", None, "this process's index (multi-host)")

_OVERRIDES: list[tuple[str, str]] = []


def initialize_distributed() -> None:
  import jax  # noqa: PLC0415

  if FLAGS.coordinator_address or FLAGS.distributed:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)


@cli.user_errors_in_one_line
def main(argv):
  del argv
  cli.quiet_libraries()
  initialize_distributed()
  import effx  # noqa: PLC0415 (after jax.distributed, which must come before jax use)

  config = cli.apply_overrides(cli.load_config(FLAGS.config), _OVERRIDES)
  # The config is logged (and written to the workdir) once it is valid and the run starts.
  effx.train_and_evaluate(config, FLAGS.workdir)


def run(argv=None) -> None:
  """Entry point: config overrides are parsed by effx (errors name the key)."""
  rest, overrides = cli.user_errors_in_one_line(cli.split_overrides)(
      sys.argv if argv is None else argv)
  _OVERRIDES[:] = overrides
  app.run(main, argv=rest)


if __name__ == "__main__":
  run()

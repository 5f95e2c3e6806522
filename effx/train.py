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

from absl import flags

from effx import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("config", None, "config file, optionally with an argument: "
                      "configs/lra_text.py:tiny", required=True)
  flags.DEFINE_string("workdir", None, "checkpoints, metrics and results go here",
                      required=True)
  flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host)")
  flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
  flags.DEFINE_integer("process_id", None, "this process's index (multi-host)")


def main(overrides) -> None:
  # jax.distributed must start before jax is used, so jax and the training stack are
  # imported here, after it.
  import jax  # noqa: PLC0415 (see above)

  if FLAGS.coordinator_address or FLAGS.distributed:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
  from effx.training import loop  # noqa: PLC0415 (after jax.distributed)

  config = cli.apply_overrides(cli.load_config(FLAGS.config), overrides)
  # The config is logged (and written to the workdir) once it is valid and the run starts.
  loop.train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run(define_flags, main, overrides=True)

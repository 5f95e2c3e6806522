"""Compile a config's training step for a TPU topology ahead of time, on any machine.

  pip install -e '.[tpu]'     # libtpu, the TPU compiler; no TPU is needed
  python -m effx.aot --config=configs/lra_listops.py --topology=v5e:4x4 \\
      [--config.key=value ...]

Lowers and compiles the training step the trainer would run (the same model, sharding
rules, objective and optimizer) over the topology's devices arranged by
``config.mesh``, with the task's shapes (``data.describe``: no data is read), and
reports XLA's per-device memory (arguments + outputs + temporaries - donated aliases)
against the chip's HBM. A mesh that does not divide the topology, or a step that does
not fit, raises before any TPU is paid for. ``python -m effx.sweep --check_topology=...``
runs it for every trial. A distillation trial is compiled without its teacher.
"""

from __future__ import annotations

from absl import flags

from effx import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("config", None, "config file[:arg]", required=True)
  flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:4x4", required=True)


def main(overrides) -> None:
  from effx.training import aot  # noqa: PLC0415 (jax: not needed by --help)

  config = cli.apply_overrides(cli.load_config(FLAGS.config), overrides)
  print(aot.describe(aot.check(config, FLAGS.topology)))


if __name__ == "__main__":
  cli.run(define_flags, main, overrides=True)

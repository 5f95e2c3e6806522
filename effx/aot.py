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

import functools
import re
import sys
from typing import Any

# HBM per device (GiB) by TPU generation, from Google Cloud's TPU system architecture pages.
HBM_GIB = {"v2": 8, "v3": 16, "v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}


def topology_devices(name: str) -> list[Any]:
  """The devices of TPU topology ``name`` (``"v5e:4x4"``, ``"v4:2x2x1"``); raises one
  clear message when libtpu is missing or jax does not know the name."""
  from jax.experimental import topologies  # noqa: PLC0415

  if not re.fullmatch(r"v[0-9a-z]+:[0-9]+(x[0-9]+){1,2}", name):
    raise ValueError(f"--topology={name!r}: write a TPU generation and chip grid, e.g. "
                     "v5e:4x4 or v4:2x2x1")
  try:
    desc = topologies.get_topology_desc(
        topology_name=name, platform="tpu", chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False,) * 3)
  except Exception as error:  # jax raises RuntimeError (JaxRuntimeError) for both
    if "not installed" in str(error):
      raise OSError("compiling for a TPU topology needs libtpu: pip install -e '.[tpu]' "
                    "(no TPU needed)") from None
    raise ValueError(f"--topology={name!r} is not a TPU topology jax knows "
                     f"({str(error).splitlines()[0][:200]})") from None
  return list(desc.devices)


def check(config, topology: str) -> dict[str, Any]:
  """Compiles ``config``'s training step for ``topology``; returns the per-device memory
  (bytes) and the chip's HBM, and raises ``ValueError`` when it does not fit."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from effx import data as data_lib  # noqa: PLC0415
  from effx import sharding, steps, trainer  # noqa: PLC0415

  devices = topology_devices(topology)
  task = data_lib.describe(config.data, config.seed)
  # Without a distillation teacher: the student's own step is compiled.
  run = trainer.Run(config, evaluation_only=True, devices=devices, task=task, teacher=False)
  step = jax.jit(
      functools.partial(steps.train_step, objective=run.objective, tx=run.tx,
                        schedule=run.schedule, dropout_key=run.dropout_key,
                        accumulate=config.grad_accum_steps),
      in_shardings=(run.state_shardings, run.batch_sharding, None),
      out_shardings=(run.state_shardings, sharding.replicated(run.mesh)),
      donate_argnums=(0,))
  tokens = jax.ShapeDtypeStruct((config.batch_size, task.max_len), jnp.int32,
                                sharding=run.batch_sharding)
  batch = {"inputs": tokens, "targets": jax.ShapeDtypeStruct(
      (config.batch_size,), jnp.int32, sharding=run.batch_sharding)}
  if task.dual:
    batch["inputs2"] = tokens
  advice = "lower batch_size, use model.remat, or more model parallelism (mesh.model)"
  with run.context():
    try:
      compiled = step.lower(run.abstract_state, batch, None).compile()
    except Exception as error:  # the TPU compiler itself refuses what cannot fit
      if "RESOURCE_EXHAUSTED" not in str(error):
        raise
      detail = str(error).split("RESOURCE_EXHAUSTED:")[-1].strip().splitlines()[0]
      raise ValueError(f"the training step does not fit on {topology} "
                       f"({dict(zip(run.mesh.axis_names, run.mesh.devices.shape))}): "
                       f"{detail}; {advice}") from None
  memory = compiled.memory_analysis()
  per_device = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  generation = topology.split(":")[0]
  hbm = HBM_GIB.get(generation)
  result = {"topology": topology, "devices": len(devices),
            "device_kind": devices[0].device_kind,
            "mesh": dict(zip(run.mesh.axis_names, run.mesh.devices.shape)),
            "per_device_bytes": int(per_device),
            "temp_bytes": int(memory.temp_size_in_bytes),
            "hbm_bytes": None if hbm is None else hbm * 2**30}
  if hbm is not None and per_device > hbm * 2**30:
    raise ValueError(f"the training step does not fit on {topology} ({result['mesh']}): "
                     f"{per_device / 2**30:.1f} GiB per device, over the {hbm} GiB of HBM; "
                     f"{advice}")
  return result


def describe(result: dict[str, Any]) -> str:
  hbm = result["hbm_bytes"]
  share = "" if hbm is None else f" of {hbm / 2**30:.0f} GiB HBM"
  return (f"{result['topology']} ({result['devices']} x {result['device_kind']}, mesh "
          f"{result['mesh']}): {result['per_device_bytes'] / 2**30:.2f} GiB per "
          f"device{share}")


def main(argv=None) -> None:
  from absl import app, flags  # noqa: PLC0415

  from effx import cli  # noqa: PLC0415

  flags.DEFINE_string("config", None, "config file[:arg]", required=True)
  flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:4x4", required=True)
  rest, overrides = cli.user_errors_in_one_line(cli.split_overrides)(
      sys.argv if argv is None else argv)

  @cli.user_errors_in_one_line
  def run(_):
    config = cli.apply_overrides(cli.load_config(flags.FLAGS.config), overrides)
    print(describe(check(config, flags.FLAGS.topology)))

  app.run(run, argv=rest)


if __name__ == "__main__":
  main()

"""A config's training step compiled for a TPU topology ahead of time, on any machine
with libtpu (``python -m effx.aot``, ``python -m effx.sweep --check_topology``).

``check`` lowers ``Run.jitted_train_step`` (the function the training loop runs) over
the topology's devices with the task's shapes (no data read; no teacher) and compares
XLA's per-device memory (arguments + outputs + temporaries - donated aliases) with the
chip's HBM.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from effx import data as data_lib
from effx.attention import kernel
from effx.training.run import Run

# HBM per device (GiB) by TPU generation, from Google Cloud's TPU system architecture pages.
HBM_GIB = {"v2": 8, "v3": 16, "v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}


def topology_devices(name: str) -> list[Any]:
  """The devices of TPU topology ``name`` (``"v5e:4x4"``, ``"v4:2x2x1"``); raises one
  clear message when libtpu is missing or jax does not know the name."""
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
    if "lockfile" in str(error):  # libtpu serves one process per machine at a time
      raise OSError("libtpu is in use by another process on this machine (one at a time); "
                    "wait for it, or remove /tmp/libtpu_lockfile if that process is "
                    "gone") from None
    raise ValueError(f"--topology={name!r} is not a TPU topology jax knows "
                     f"({str(error).splitlines()[0][:200]})") from None
  return list(desc.devices)


def check(config, topology: str) -> dict[str, Any]:
  """Compiles ``config``'s training step for ``topology``; returns the per-device memory
  (bytes) and the chip's HBM, and raises ``ValueError`` when it does not fit."""
  devices = topology_devices(topology)
  task = data_lib.describe(config.data, config.seed)
  # Without a distillation teacher: the student's own step is compiled.
  run = Run(config, evaluation_only=True, devices=devices, task=task, teacher=False)
  step = run.jitted_train_step()  # the very function the training loop runs
  tokens = jax.ShapeDtypeStruct((config.batch_size, task.max_len), jnp.int32,
                                sharding=run.batch_sharding)
  batch = {"inputs": tokens, "targets": jax.ShapeDtypeStruct(
      (config.batch_size,), jnp.int32, sharding=run.batch_sharding)}
  if task.dual:
    batch["inputs2"] = tokens
  advice = "lower batch_size, use model.remat, or more model parallelism (mesh.model)"
  # Traced for the topology's chips (splash attention where the family's layout allows
  # it), whatever this machine's own backend.
  with run.context(), kernel.platform("tpu"), kernel.recording() as backends:
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
            "attention_backend": ", ".join(sorted(backends)),
            **_costs(compiled),
            "hbm_bytes": None if hbm is None else hbm * 2**30}
  if hbm is not None and per_device > hbm * 2**30:
    raise ValueError(f"the training step does not fit on {topology} ({result['mesh']}): "
                     f"{per_device / 2**30:.1f} GiB per device, over the {hbm} GiB of HBM; "
                     f"{advice}")
  return result


def _costs(compiled) -> dict[str, float | None]:
  """XLA's per-device estimate of the step's floating-point operations and bytes moved
  (None where the compiler gives none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost or {}
  return {"flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed")}


def describe(result: dict[str, Any]) -> str:
  hbm = result["hbm_bytes"]
  share = "" if hbm is None else f" of {hbm / 2**30:.0f} GiB HBM"
  return (f"{result['topology']} ({result['devices']} x {result['device_kind']}, mesh "
          f"{result['mesh']}): {result['per_device_bytes'] / 2**30:.2f} GiB per "
          f"device{share}")

"""Device mesh and logical-axis sharding for training.

The mesh has axes ``("data", "model")``; parameters are sharded by the config's
logical-axis rules (``effx.common.axes`` names -> mesh axes), batches along ``data``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "model")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
  """``(data, model)`` sizes; one ``-1`` takes the remaining devices."""
  sizes = [mesh_config.data, mesh_config.model]
  for name, size in zip(AXES, sizes):
    if not isinstance(size, int) or (size <= 0 and size != -1):
      raise ValueError(f"mesh.{name}={size!r} must be a positive integer or -1")
  if sizes.count(-1) > 1:
    raise ValueError("at most one of mesh.data, mesh.model may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    raise ValueError(f"mesh (data={mesh_config.data}, model={mesh_config.model}) does not "
                     f"divide the {num_devices} devices")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh data={sizes[0]} x model={sizes[1]} = {math.prod(sizes)} "
                     f"devices, but {num_devices} are present")
  return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[Any] | None = None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  # Auto axis types: Linen's logical constraints need them (explicit mode rejects them).
  return Mesh(np.asarray(devices).reshape(shape), AXES)


def rules(config) -> tuple[tuple[str, str | None], ...]:
  return tuple((str(a), None if b is None else str(b)) for a, b in config.sharding_rules)


def tree_shardings(boxed_tree, mesh: Mesh, logical_rules):
  """NamedShardings for a tree whose leaves may be ``nn.Partitioned`` boxes (unboxed
  leaves are replicated); the result matches ``nn.unbox(boxed_tree)``'s structure."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, logical_rules)


def strip_boxes(tree):
  """``tree`` with ``nn.Partitioned`` boxes replaced by their values (no constraint
  applied, so it also works on shape structs outside ``jit``)."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree,
                      is_leaf=is_box)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's local batch into global arrays sharded along ``data``."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}

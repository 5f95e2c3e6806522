"""Checkpoints of a training run: orbax, atomic, newest K kept, with restore fallback.

``workdir/checkpoints/<step>/`` holds ``state`` (params, optimizer state, step),
``data`` (the input iterator's position) and ``meta`` (best validation so far).
``workdir/best/<step>/`` holds the parameters of the best-on-validation step, for the
final test evaluation. Orbax writes each step into a temporary folder and renames it
when complete, so a kill mid-save leaves the previous checkpoint as the newest.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from effx.common import axes, files


def abstract_like(tree, shardings):
  """``ShapeDtypeStruct``s of ``tree`` (arrays or shape structs) carrying ``shardings``:
  the target orbax restores into, laid out for the current mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class Checkpoints:
  """The run's checkpoint folders."""

  def __init__(self, workdir: str, keep: int, *, asynchronous: bool = True):
    workdir = files.absolute(workdir)  # orbax writes to a bucket itself
    self.directory = os.path.join(workdir, "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data", "meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=asynchronous))
    self.best = ocp.CheckpointManager(
        os.path.join(workdir, "best"), item_names=("params",),
        options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                             enable_async_checkpointing=False))
    # step of each regular checkpoint -> the best step its bookkeeping points at: a best
    # is deleted only when no kept checkpoint points at it (see ``keep_referenced_best``).
    self._best_of: dict[int, int] = {}

  def save(self, step: int, state, data_state: dict, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    self._best_of[step] = int(meta.get("best_step", -1))
    self.keep_referenced_best(step)

  def read_best_references(self) -> None:
    """Learns which best step each kept checkpoint points at (on resume)."""
    for step in self.manager.all_steps():
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta
        self._best_of[step] = int(meta.get("best_step", -1))
      except Exception:  # noqa: BLE001 (a damaged step: its best is kept, harmlessly)
        continue

  def keep_referenced_best(self, newest: int) -> None:
    """Deletes best checkpoints that no kept regular checkpoint points at and that are
    not newer than ``newest`` (a newer one is the run's current best)."""
    kept = set(self.manager.all_steps()) | {newest}
    referenced = {b for s, b in self._best_of.items() if s in kept}
    for old in self.best.all_steps():  # every host calls delete: orbax coordinates it
      if old not in referenced and old <= newest:
        self.best.delete(old)

  def restore_latest(self, abstract_state) -> tuple[Any, dict, dict, int] | None:
    """Newest checkpoint that restores: ``(state, data_state, meta, step)``, or None.

    A checkpoint that cannot be read (half-deleted, corrupted) is reported and the next
    older one tried; once an older one restores, the damaged folders are renamed
    ``<step>.damaged`` (kept for inspection, out of the way of the resumed run's saves).
    When none restores, nothing is moved and ``CheckpointError`` names each failure: the
    cause may be passing (memory, a network file system), and starting over would
    overwrite the run. A readable checkpoint of a different model (other parameter
    names or shapes) raises ``StructureMismatchError`` naming the differences.
    """
    damaged, errors = [], []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
      except Exception as error:  # orbax raises many types for a damaged step
        mismatch = self._mismatch(step, abstract_state)
        if mismatch:
          self._set_aside(damaged)
          raise StructureMismatchError(
              f"checkpoint {self.directory}/{step} holds a different model than this "
              f"config builds:\n" + "\n".join(f"  {line}" for line in mismatch) +
              "\nUse another --workdir for this config") from None
        logging.error("checkpoint %s/%d failed to restore (%s: %s); trying an older one",
                      self.directory, step, type(error).__name__, str(error)[:500])
        damaged.append(step)
        errors.append(f"  step {step}: {type(error).__name__}: {str(error)[:200]}")
        continue
      self._set_aside(damaged)
      return restored.state, restored.data, restored.meta, step
    if damaged:
      raise CheckpointError(
          f"no checkpoint in {self.directory} restores (nothing was moved or deleted):\n"
          + "\n".join(errors) + "\nIf they are damaged for good, move them away and rerun "
          "to start over, or use another --workdir")
    return None

  def _mismatch(self, step: int, abstract_state) -> list[str]:
    """Differences between the arrays stored at ``step`` and ``abstract_state``'s (names
    and shapes; at most 8 lines), or ``[]`` when they agree or the metadata itself is
    unreadable (then the checkpoint is damaged)."""
    try:
      with ocp.StandardCheckpointer() as reader:
        stored = reader.metadata(os.path.join(self.directory, str(step), "state"))
      stored = _shapes(getattr(stored.item_metadata, "tree", stored.item_metadata))
    except Exception:  # noqa: BLE001 (unreadable metadata: a damaged checkpoint)
      return []
    if not stored:
      return []
    wanted = _shapes(abstract_state)
    order = lambda keys: sorted(keys, key=lambda k: (not k.startswith("params/"), k))  # noqa: E731
    lines = [f"{k}: stored {stored[k]}, model {wanted[k]}"
             for k in order(set(stored) & set(wanted)) if stored[k] != wanted[k]]
    lines += [f"{k}: in the checkpoint, not in the model"
              for k in order(set(stored) - set(wanted))]
    lines += [f"{k}: in the model, not in the checkpoint"
              for k in order(set(wanted) - set(stored))]
    return lines[:8] + ([f"... and {len(lines) - 8} more"] if len(lines) > 8 else [])

  def restore_step(self, abstract_state, step: int) -> tuple[Any, dict, dict, int]:
    """Checkpoint ``step``: ``(state, data_state, meta, step)``; a missing step names the
    ones there are."""
    if step not in self.manager.all_steps():
      raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}; steps: "
                              f"{', '.join(map(str, sorted(self.manager.all_steps()))) or 'none'}")
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return restored.state, restored.data, restored.meta, step

  def _set_aside(self, steps) -> None:
    if not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        path = os.path.join(self.directory, str(step))
        target, n = f"{path}.damaged", 1
        while files.exists(target):  # set aside before, by an earlier resume
          target, n = f"{path}.damaged{n}", n + 1
        files.rename(path, target)
        logging.error("moved the damaged checkpoint to %s", target)
    multihost_utils.sync_global_devices("effx_checkpoint_set_aside")
    self.manager.reload()

  def save_best(self, step: int, params) -> None:
    for old in self.best.all_steps():
      if old >= step:  # left over from a run that was killed and resumed earlier
        self.best.delete(old)
    self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                   force=True)

  def drop_best_after(self, step: int) -> None:
    """Forgets best checkpoints newer than the resumed step (they will be redone)."""
    for old in self.best.all_steps():
      if old > step:
        self.best.delete(old)

  def restore_best(self, abstract_params, step: int):
    return self.best.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params))).params

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
    self.best.close()


class CheckpointError(OSError):
  """No checkpoint of a run restores."""


class StructureMismatchError(ValueError):
  """A readable checkpoint whose arrays do not match the model's."""


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """``{"params/encoder/.../kernel": shape}`` for every array leaf of ``tree`` (a state,
  abstract state or orbax metadata tree)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = getattr(leaf, "shape", None)
    if shape is None:
      continue
    out[axes.path_name(path)] = tuple(shape)
  return out


def restore_params(directory: str, abstract_params):
  """Parameters from another run's checkpoint folder (its newest step): used for
  ``config.init_checkpoint``. ``directory`` is a workdir or its ``checkpoints`` folder."""
  if files.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  with ocp.CheckpointManager(directory, item_names=("state", "data", "meta")) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"init_checkpoint={directory!r} holds no checkpoint")
    item = {"params": abstract_params}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))
  return restored.state["params"]

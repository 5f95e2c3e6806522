"""Compression: a trained model into a compact student, in the one training loop.

* ``distill``: the losses toward a frozen teacher, layer maps, a student started from
  the teacher's layers, and every check of ``config.distill`` (the teacher is loaded by
  ``effx.training.teachers``, the objective is ``effx.training.objectives.Distillation``).
* ``prune``: magnitude and movement pruning on Zhu & Gupta's schedule (``Pruning``).
* ``quant``: quantization-aware training and integer export with qwix
  (``Quantization``).
* ``structured``: attention heads and feed-forward units scored by importance and cut
  out of the parameters.

``parts(config)`` gives the methods a config turns on as ``Part`` objects, which the
training loop asks what to change (model, optimizer, best-checkpoint window, metrics).
"""

from __future__ import annotations

from effx.compress import prune, quant
from effx.compress.part import Part


def parts(config) -> list[Part]:
  """The compression parts ``config`` turns on (``config.quant.mode``,
  ``config.prune.method``), in the order they wrap the run."""
  on: list[Part] = []
  if config.quant.mode != "none":
    on.append(quant.Quantization(config.quant))
  if config.prune.method != "none":
    on.append(prune.Pruning(config.prune, config.num_train_steps))
  return on

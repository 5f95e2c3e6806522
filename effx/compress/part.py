"""``Part``: what a compression method asks of the one training loop.

A part changes the run where the loop asks it to, and nowhere else: the model it
builds (quantization intercepts its matmuls), the optimizer (pruning masks the
updates), the first step whose checkpoint may become the best (a pruned model is
compared only once it has its final sparsity), what each validation and the results
report, and whether the run can train at all (an integer export is evaluated only).
Each method is off unless its config section turns it on; ``effx.compress.parts``
lists the ones that are on.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import optax


class Part:
  """A compression method in a run; every hook leaves the run unchanged by default."""

  # Why the run cannot train (None: it can); raised before anything is written.
  training_error: str | None = None

  def wrap_model(self, model: nn.Module) -> nn.Module:
    return model

  def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    return tx

  def best_from(self) -> int:
    """The first step whose checkpoint may be chosen as the best on validation."""
    return 0

  def metrics(self, params: Any) -> dict[str, float]:
    """Added to every validation's metrics."""
    del params
    return {}

  def results(self, params: Any) -> dict[str, Any]:
    """Added to the run's ``results.json``."""
    del params
    return {}

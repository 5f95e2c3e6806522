"""The layer stack: plain, rematerialised, or reversible, always scanned over layers.

Layers are applied with a scan over parameters stacked on a leading ``layers`` axis.
Besides compiling once whatever the depth, the loop is what makes rematerialisation hold
on every backend: in straight-line code XLA may schedule the recomputation early (on CPU
it does), keeping every layer's activations alive anyway; a loop body cannot be hoisted.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from effx.common import axes
from effx.layers import remat
from effx.layers.config import BlockConfig
from effx.layers.reversible import ReversibleStack, check_reversible
from effx.layers.sublayers import EncoderBlock, layer_norm


class _ScannedBlock(nn.Module):
  """``EncoderBlock`` in the carry/outputs form ``nn.scan`` expects."""

  config: BlockConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x, mask, positions):
    block = EncoderBlock
    if self.config.remat != "none":
      # Inside a scan there is nothing for CSE to merge across iterations.
      block = nn.remat(EncoderBlock, policy=remat.policy(self.config.remat), prevent_cse=False,
                       static_argnums=(3,))
    x, attn = block(self.config, name="block")(x, mask, self.deterministic, positions)
    return x, (x, attn)


class Stack(nn.Module):
  """``num_layers`` blocks, followed by a final LayerNorm when they are pre-norm.

  Attributes:
    config: block hyperparameters (``config.remat`` picks the remat policy).
    num_layers: depth.
    reversible: reversible residual layers (activation memory flat in depth).

  ``__call__(x, mask, deterministic, positions=None)`` returns ``(y, aux)`` with
  ``aux = {"hidden": [num_layers, batch, length, emb_dim] per-layer outputs,
  "attention": [num_layers, batch, length, width] attention sub-block outputs}``.
  Parameters are stacked over layers (``layers/...``, leading axis ``num_layers``).
  """

  config: BlockConfig
  num_layers: int
  reversible: bool = False

  def __post_init__(self):
    if not isinstance(self.num_layers, int) or self.num_layers <= 0:
      raise ValueError(f"model.num_layers={self.num_layers!r} must be a positive integer")
    if self.reversible:
      check_reversible(self.config)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool,
               positions: jax.Array | None = None):
    cfg = self.config
    if self.reversible:
      x, aux = ReversibleStack(cfg, self.num_layers, name="layers")(
          x, mask, deterministic, positions)
    else:
      scanned = nn.scan(
          _ScannedBlock, variable_axes={c: 0 for c in ("params", "state", "intermediates",
                                                       "losses", "metrics")},
          split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast, nn.broadcast),
          length=self.num_layers, metadata_params={nn.PARTITION_NAME: axes.LAYERS})
      x, (hidden, attention) = scanned(cfg, deterministic, name="layers")(x, mask, positions)
      aux = {"hidden": hidden, "attention": attention}
    if cfg.norm == "pre":  # post-norm blocks end normalised
      x = layer_norm(cfg, "final_norm")(x)
    return x, aux

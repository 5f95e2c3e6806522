"""Byte-level decoder-only language model with optional segment memory."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effx import axes
from effx.layers.memory import MemoryStack, empty_memory
from effx.layers.stack import Stack
from effx.models.config import DTYPES, ModelConfig
from effx.models.embedding import Embedder


class CausalLM(nn.Module):
  """Next-token logits for every position.

  ``__call__(inputs, train=False, memory=None) -> (logits [batch, length, vocab], aux)``.
  With ``config.mem_len > 0`` (Transformer-XL) or ``compressed_len > 0`` (Compressive
  Transformer), feed a long text segment by segment and pass ``aux["memory"]`` back as
  ``memory``; ``memory=None`` starts empty. ``aux`` also holds per-layer ``hidden`` and
  ``attention`` outputs and ``compression_loss`` (0 without compression), which the
  training loss should add.
  """

  config: ModelConfig

  def initial_memory(self, batch: int) -> dict[str, jax.Array]:
    cfg = self.config
    return empty_memory(batch, cfg.num_layers, cfg.emb_dim, cfg.mem_len, cfg.compressed_len,
                        DTYPES[cfg.dtype])

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool = False,
               memory: dict[str, Any] | None = None):
    cfg = self.config
    if cfg.reversible:
      x, mask, positions = Embedder(cfg, name="embed")(inputs)
      x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not train)
      y, aux = Stack(cfg.block, cfg.num_layers, reversible=True, name="decoder")(
          x, mask, not train, positions)
      aux = {**aux, "compression_loss": jnp.zeros((), jnp.float32)}
    else:
      if memory is None:
        memory = self.initial_memory(inputs.shape[0])
      x, mask, positions = Embedder(cfg, name="embed")(inputs, memory["next_position"])
      x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not train)
      y, new_memory, aux = MemoryStack(
          cfg.block, cfg.num_layers, cfg.mem_len, cfg.compressed_len, cfg.compression_rate,
          cfg.compression, name="decoder")(x, mask, positions, memory, not train)
      aux = {**aux, "memory": new_memory}
    logits = nn.Dense(cfg.vocab_size, dtype=jnp.float32, name="logits",
                      kernel_init=nn.with_logical_partitioning(
                          nn.initializers.lecun_normal(), (axes.EMBED, axes.VOCAB)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                             (axes.VOCAB,)))(y)
    return logits, {**aux, "embedded": x, "final": y, "mask": mask}

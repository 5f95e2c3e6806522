"""Byte-level decoder-only language model with optional segment memory."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effx.attention import registry
from effx.common import axes
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

  Incremental decoding (``effx.models.generate``): ``cache`` (from ``init_cache``) holds each
  layer's attention state and the next position; ``inputs`` is then one token per row
  ``[batch, 1]`` and ``aux["cache"]`` the state after it. Models with segment memory
  decode through their memory instead (one-token segments).
  """

  config: ModelConfig

  def initial_memory(self, batch: int) -> dict[str, jax.Array]:
    cfg = self.config
    return empty_memory(batch, cfg.num_layers, cfg.emb_dim, cfg.mem_len, cfg.compressed_len,
                        DTYPES[cfg.dtype])

  def init_cache(self, batch: int, capacity: int) -> dict[str, Any]:
    """The decoding state before the first token, for up to ``capacity`` tokens per row:
    ``{"layers": each layer's family state stacked on a leading axis, "position":
    int32 [batch]}``. Raises for models that cannot decode token by token."""
    cfg = self.config
    if cfg.reversible or cfg.mem_len or cfg.compressed_len:
      raise ValueError("init_cache: reversible models and models with segment memory have "
                       "no per-layer decoding cache (segment-memory models decode through "
                       "their memory)")
    block = cfg.block
    family = registry.make(cfg.attention, causal=True, parent=None, **block.family_options)
    if not family.decodable:
      raise ValueError(f"attention family {cfg.attention!r} cannot decode token by token")
    head = cfg.qkv_dim // cfg.num_heads
    layer = family.decode_init(batch, cfg.num_heads, head, head, capacity, DTYPES[cfg.dtype])
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (cfg.num_layers, *x.shape)), layer)
    return {"layers": stacked, "position": jnp.zeros((batch,), jnp.int32)}

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool = False,
               memory: dict[str, Any] | None = None, cache: dict[str, Any] | None = None):
    cfg = self.config
    if cache is not None:
      x, mask, positions = Embedder(cfg, name="embed")(inputs, cache["position"])
      y, _, aux = MemoryStack(
          cfg.block, cfg.num_layers, cfg.mem_len, cfg.compressed_len, cfg.compression_rate,
          cfg.compression, name="decoder")(x, mask, positions, self.initial_memory(
              inputs.shape[0]), True, cache=cache["layers"])
      aux = {**aux, "cache": {"layers": aux["cache"], "position": cache["position"] + 1}}
    elif cfg.reversible:
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

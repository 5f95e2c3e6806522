"""Token embeddings with positions and the padding mask (padding id 0)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from effx.common import axes
from effx.layers.positional import AbsolutePositions
from effx.layers.sublayers import layer_norm
from effx.models.config import DTYPES, ModelConfig


class Embedder(nn.Module):
  """``tokens [batch, length]`` -> ``(x [batch, length', emb_dim], mask, positions)``.

  ``mask`` is ``tokens != 0``. With ``config.pool == "cls"`` (classifiers) a learned
  [CLS] vector is prepended (``length' = length + 1``, CLS at position 0; the
  position table has ``max_len + 1`` rows, so inputs may be ``max_len`` long). Learned and
  sinusoidal positions are added here; rotary and Shortformer positions are applied
  inside attention from the returned ``positions``. ``offset`` shifts the positions
  (a causal LM's later segments). With ``config.type_vocab_size`` a token-type table is
  added too (``token_types [batch, length]``, default all 0), and with
  ``config.norm == "post"`` the sum is layer-normalised (BERT's embedding LayerNorm).
  """

  config: ModelConfig
  with_cls: bool = False

  @nn.compact
  def __call__(self, tokens: jax.Array, offset: jax.Array | None = None,
               token_types: jax.Array | None = None):
    cfg = self.config
    if tokens.ndim != 2:
      raise ValueError(f"inputs must be integer tokens [batch, length], got {tokens.shape}")
    if cfg.positional == "learned" and tokens.shape[1] > cfg.max_len:
      raise ValueError(f"input length {tokens.shape[1]} exceeds model.max_len={cfg.max_len}")
    length = tokens.shape[1] + int(self.with_cls)
    table = self.param("embedding", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), (axes.VOCAB, axes.EMBED)), (cfg.vocab_size, cfg.emb_dim))
    x = jnp.take(table, tokens, axis=0)
    mask = tokens != 0
    if self.with_cls:
      cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                           (axes.EMBED,)), (cfg.emb_dim,))
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, cfg.emb_dim)), x], axis=1)
      mask = jnp.concatenate([jnp.ones((x.shape[0], 1), bool), mask], axis=1)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (x.shape[0], length))
    if offset is not None:
      positions = positions + offset[:, None]
    if cfg.positional in ("learned", "sinusoidal"):
      x = x + AbsolutePositions(cfg.positional, cfg.max_len + int(self.with_cls), cfg.emb_dim,
                                name="positions")(positions)
    if cfg.type_vocab_size:
      types = self.param("token_types", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), (None, axes.EMBED)), (cfg.type_vocab_size, cfg.emb_dim))
      if token_types is None:
        x = x + types[0]
      else:
        if self.with_cls:
          token_types = jnp.pad(token_types, ((0, 0), (1, 0)))
        x = x + jnp.take(types, token_types, axis=0)
    elif token_types is not None:
      raise ValueError("token_types given, but model.type_vocab_size=0 (no token-type table)")
    if cfg.norm == "post":
      x = layer_norm(cfg.block, "norm")(x)
    x = nn.with_logical_constraint(x.astype(DTYPES[cfg.dtype]),
                                   (axes.BATCH, axes.LENGTH, axes.EMBED))
    return x, mask, positions

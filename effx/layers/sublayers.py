"""Residual sub-blocks: ``dropout(attention(norm(x)))`` and
``dropout(feed_forward(norm(x)))`` (pre-norm), or the same without the norm when the
block normalises after the residual sum (``BlockConfig.norm == "post"``, BERT). The plain
and reversible stacks add them to the residual stream in their own ways."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name

from effx.attention import SelfAttention
from effx.common import axes
from effx.layers.config import BlockConfig
from effx.layers.feed_forward import FeedForward
from effx.layers.positional import sinusoidal

ACTIVATIONS = {"gelu_tanh": functools.partial(nn.gelu, approximate=True),
               "gelu": functools.partial(nn.gelu, approximate=False), "relu": nn.relu}


def layer_norm(config: BlockConfig, name: str) -> nn.LayerNorm:
  """LayerNorm (epsilon ``config.layer_norm_eps``) with its scale and bias annotated on
  the ``embed`` axis."""
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axes.EMBED,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.EMBED,)))


class AttentionSublayer(nn.Module):
  """``dropout(SelfAttention(LayerNorm(x)))`` of width ``width`` (no LayerNorm with
  ``config.norm == "post"``)."""

  config: BlockConfig
  width: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool,
               positions: jax.Array | None = None, cache: dict | None = None):
    """``cache``: a decoding state (``SelfAttention``); then returns ``(out, cache)``."""
    cfg = self.config
    h = layer_norm(cfg, "norm")(x) if cfg.norm == "pre" else x
    qk_input = None
    if cfg.positional == "shortformer":
      if positions is None:
        raise ValueError("positional='shortformer' needs the token positions")
      qk_input = h + sinusoidal(positions, self.width).astype(h.dtype)
    out = SelfAttention(
        num_heads=cfg.num_heads, qkv_features=cfg.qkv_dim, out_features=self.width,
        attention=cfg.attention, attention_kwargs=cfg.family_options, causal=cfg.causal,
        dropout_rate=cfg.attention_dropout_rate, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        rotary=cfg.positional == "rotary", name="attention",
    )(h, mask, deterministic, qk_input=qk_input, positions=positions, cache=cache)
    if cache is not None:
      out, cache = out
    out = checkpoint_name(out, "attn_out")
    out = nn.Dropout(cfg.dropout_rate)(out, deterministic=deterministic)
    return out if cache is None else (out, cache)


class FeedForwardSublayer(nn.Module):
  """``dropout(FeedForward(LayerNorm(x)))`` of width ``width`` (no LayerNorm with
  ``config.norm == "post"``)."""

  config: BlockConfig
  width: int

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    cfg = self.config
    h = layer_norm(cfg, "norm")(x) if cfg.norm == "pre" else x
    out = FeedForward(mlp_dim=cfg.mlp_dim, out_dim=self.width, dropout_rate=cfg.dropout_rate,
                      chunk_size=cfg.ff_chunk_size, activation=ACTIVATIONS[cfg.activation],
                      dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, name="feed_forward")(h, deterministic)
    out = checkpoint_name(out, "mlp_out")
    return nn.Dropout(cfg.dropout_rate)(out, deterministic=deterministic)


class EncoderBlock(nn.Module):
  """``x + attn(x)``, then ``+ ffn``; with ``config.norm == "post"`` each sum is followed
  by a LayerNorm (``attention_norm``, ``mlp_norm``). Returns ``(y, attention_output)``."""

  config: BlockConfig

  @nn.compact
  def __call__(self, x, mask, deterministic, positions=None):
    cfg, width = self.config, x.shape[-1]
    attn = AttentionSublayer(cfg, width, name="attention_block")(
        x, mask, deterministic, positions)
    x = x + attn
    if cfg.norm == "post":
      x = layer_norm(cfg, "attention_norm")(x)
    x = x + FeedForwardSublayer(cfg, width, name="mlp_block")(x, deterministic)
    if cfg.norm == "post":
      x = layer_norm(cfg, "mlp_norm")(x)
    return x, attn

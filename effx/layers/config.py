"""``BlockConfig``: the hyperparameters every transformer block of a model shares."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from effx.attention import registry
from effx.layers import positional, remat

NORMS = ("pre", "post")
ACTIVATIONS = ("gelu_tanh", "gelu", "relu")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Shared block hyperparameters (frozen, so modules can hold it as an attribute).

  Attributes:
    emb_dim: residual stream width.
    num_heads: attention heads.
    qkv_dim: total query/key/value width.
    mlp_dim: feed-forward hidden width.
    dropout_rate: dropout on sub-block outputs and the feed-forward hidden layer.
    attention_dropout_rate: dropout on the mixed attention heads.
    attention: attention family name; ``attention_kwargs`` its options, as
      ``(name, value)`` pairs (hashable).
    causal: causal attention.
    ff_chunk_size: feed-forward chunk length (None: unchunked).
    positional: one of ``effx.layers.positional.KINDS``.
    remat: one of ``effx.layers.remat.NAMES``.
    norm: ``"pre"`` (``x + f(LayerNorm(x))``, a final LayerNorm after the stack) or
      ``"post"`` (BERT: ``LayerNorm(x + f(x))``, no final LayerNorm).
    layer_norm_eps: every LayerNorm's epsilon.
    activation: the feed-forward nonlinearity: ``"gelu_tanh"`` (the tanh approximation),
      ``"gelu"`` (exact, with erf: BERT's), or ``"relu"``.
    dtype, param_dtype: computation and parameter dtypes.
  """

  emb_dim: int
  num_heads: int
  qkv_dim: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  attention: str = "dense"
  attention_kwargs: tuple[tuple[str, Any], ...] = ()
  causal: bool = False
  ff_chunk_size: int | None = None
  positional: str = "learned"
  remat: str = "none"
  norm: str = "pre"
  layer_norm_eps: float = 1e-6
  activation: str = "gelu_tanh"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("emb_dim", "num_heads", "qkv_dim", "mlp_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"model.{name}={value!r} must be a positive integer")
    if self.qkv_dim % self.num_heads:
      raise ValueError(f"model.qkv_dim={self.qkv_dim} is not divisible by "
                       f"model.num_heads={self.num_heads}")
    for name in ("dropout_rate", "attention_dropout_rate"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"model.{name}={getattr(self, name)!r} must be in [0, 1)")
    if self.ff_chunk_size is not None and (not isinstance(self.ff_chunk_size, int)
                                           or self.ff_chunk_size <= 0):
      raise ValueError(f"model.ff_chunk_size={self.ff_chunk_size!r} must be a positive "
                       "integer or None")
    if self.positional not in positional.KINDS:
      raise ValueError(f"model.positional={self.positional!r} is not one of "
                       f"{', '.join(map(repr, positional.KINDS))}")
    if self.norm not in NORMS:
      raise ValueError(f"model.norm={self.norm!r} is not one of {', '.join(map(repr, NORMS))}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"model.activation={self.activation!r} is not one of "
                       f"{', '.join(map(repr, ACTIVATIONS))}")
    if not isinstance(self.layer_norm_eps, float) or not 0.0 < self.layer_norm_eps < 1.0:
      raise ValueError(f"model.layer_norm_eps={self.layer_norm_eps!r} must be a float in "
                       "(0, 1)")
    remat.policy(self.remat)  # raises on an unknown name
    # Fails here, naming the option, for an unknown family, option or causal mismatch.
    registry.make(self.attention, causal=self.causal, parent=None, **self.family_options)

  @property
  def family_options(self) -> dict[str, Any]:
    return dict(self.attention_kwargs)

  @property
  def has_mutable_state(self) -> bool:
    return registry.get(self.attention).mutable_state

  @property
  def has_auxiliary_loss(self) -> bool:
    return registry.get(self.attention).auxiliary_loss

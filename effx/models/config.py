"""``ModelConfig``: the validated form of ``config.model``."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from effx.attention import registry
from effx.common import schema
from effx.layers.config import BlockConfig
from effx.layers.memory import check_memory
from effx.layers.reversible import check_reversible

KINDS = ("classifier", "dual_encoder", "causal_lm", "encoder")
POOLS = ("cls", "mean", "first")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every ``config.model`` key, with its default. Unknown keys are errors. These are
  the only model defaults in effx: a training config's ``model`` section starts from
  them (``effx.training.defaults.base``).

  Attributes:
    kind: ``"classifier"`` | ``"dual_encoder"`` | ``"causal_lm"`` | ``"encoder"``
      (returns the pooled vector: sentence embeddings).
    vocab_size: token ids are ``0..vocab_size-1``; 0 is padding.
    max_len: longest input (learned positions have this many rows).
    num_classes: classifier outputs (ignored by ``causal_lm``).
    num_layers, emb_dim, num_heads, qkv_dim, mlp_dim: transformer sizes.
    dropout_rate: on embeddings, sub-block outputs and the feed-forward hidden layer.
    attention_dropout_rate: on the mixed attention heads.
    attention, attention_kwargs: family name and options.
    implementation: the attention's backend: ``"auto"`` (the fastest the device and
      input allow: the block-sparse Pallas kernel or cuDNN on a GPU, splash attention
      on a TPU, XLA elsewhere) or one of ``effx.attention.backends(attention)``
      (``"xla"``, ``"pallas"``, ``"splash"``, and ``"cudnn"`` for dense); a family's
      ``implementation`` option says the same.
    pool: ``"cls"`` (a learned [CLS] vector prepended to the sequence), ``"mean"``
      (over real tokens) or ``"first"`` (the first input token's output, e.g. a [CLS]
      token the tokenizer put there); not for ``causal_lm``.
    positional: ``"learned"`` | ``"sinusoidal"`` | ``"rotary"`` | ``"shortformer"`` |
      ``"none"``.
    reversible: reversible residual stack.
    ff_chunk_size: feed-forward chunk length (None: unchunked).
    remat: ``"none"`` | ``"full"`` | ``"dots"`` | ``"attention"``.
    classifier_dim: hidden width of the classifier head (default: ``mlp_dim``).
    mem_len, compressed_len, compression_rate, compression: segment memory of the
      causal LM (``effx.layers.memory``).
    norm: ``"pre"`` (default) or ``"post"`` (BERT: LayerNorm after each residual sum,
      and on the embeddings; no final LayerNorm).
    layer_norm_eps: every LayerNorm's epsilon.
    activation: feed-forward nonlinearity, ``"gelu_tanh"`` | ``"gelu"`` (exact) |
      ``"relu"``.
    type_vocab_size: rows of a token-type (segment) embedding table added to the token
      embeddings (BERT's; 0: none). Inputs without token types use type 0.
    normalize: L2-normalise the pooled vector (sentence embeddings; ``kind="encoder"``).
    dtype: computation dtype, ``"float32"`` or ``"bfloat16"`` (parameters stay float32).
  """

  kind: str = "classifier"
  vocab_size: int = 256
  max_len: int = 1024
  num_classes: int = 2
  num_layers: int = 4
  emb_dim: int = 256
  num_heads: int = 4
  qkv_dim: int = 256
  mlp_dim: int = 1024
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  attention: str = "dense"
  attention_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  implementation: str = "auto"
  pool: str = "cls"
  positional: str = "learned"
  reversible: bool = False
  ff_chunk_size: int | None = None
  remat: str = "none"
  classifier_dim: int | None = None
  mem_len: int = 0
  compressed_len: int = 0
  compression_rate: int = 2
  compression: str = "mean"
  norm: str = "pre"
  layer_norm_eps: float = 1e-6
  activation: str = "gelu_tanh"
  type_vocab_size: int = 0
  normalize: bool = False
  dtype: str = "float32"

  def __post_init__(self):
    _choice("kind", self.kind, KINDS)
    _choice("pool", self.pool, POOLS)
    _choice("dtype", self.dtype, tuple(DTYPES))
    for name in ("vocab_size", "max_len", "num_classes", "num_layers"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"model.{name}={value!r} must be a positive integer")
    if self.kind == "causal_lm" and not registry.supports_causal(self.attention):
      causal = [n for n in registry.names() if registry.supports_causal(n)]
      raise ValueError(f"model.attention={self.attention!r} cannot be causal, which "
                       f"model.kind='causal_lm' needs; causal families: {', '.join(causal)}")
    if (not isinstance(self.type_vocab_size, int) or isinstance(self.type_vocab_size, bool)
        or self.type_vocab_size < 0):
      raise ValueError(f"model.type_vocab_size={self.type_vocab_size!r} must be an integer "
                       ">= 0 (0: no token-type embeddings)")
    if self.normalize and self.kind != "encoder":
      raise ValueError(f"model.normalize=True L2-normalises sentence embeddings, which "
                       f"model.kind='encoder' returns (this model is {self.kind!r})")
    if self.kind == "causal_lm" and self.norm != "pre":
      raise ValueError("model.kind='causal_lm' has pre-norm blocks only; set model.norm='pre'")
    if self.kind != "causal_lm" and (self.mem_len or self.compressed_len):
      raise ValueError("model.mem_len / model.compressed_len are for model.kind='causal_lm'")
    if self.classifier_dim is not None and (
        not isinstance(self.classifier_dim, int) or isinstance(self.classifier_dim, bool)
        or self.classifier_dim <= 0):
      raise ValueError(f"model.classifier_dim={self.classifier_dim!r} must be a positive "
                       "integer or None (None: model.mlp_dim)")
    block = self.block  # validates the block options
    if self.reversible:
      check_reversible(block)
    if self.kind == "causal_lm":
      check_memory(block, self.mem_len, self.compressed_len, self.compression_rate,
                   self.compression)
      if self.reversible and self.mem_len:
        raise ValueError("model.reversible=True does not support segment memory "
                         "(model.mem_len > 0)")
      if self.positional == "learned" and self.mem_len:
        raise ValueError("model.positional='learned' cannot index positions past max_len "
                         "across segments; use 'rotary', 'sinusoidal' or 'shortformer' "
                         "with model.mem_len > 0")

  def _family_options(self) -> dict[str, Any]:
    options = dict(self.attention_kwargs)
    if self.implementation != "auto":
      given = options.setdefault("implementation", self.implementation)
      if given != self.implementation:
        raise ValueError(f"model.implementation={self.implementation!r} and "
                         f"model.attention_kwargs.implementation={given!r} disagree; "
                         "set one")
    if options.get("implementation", "auto") not in registry.backends(self.attention) + ("auto",):
      raise ValueError(f"model.implementation={options['implementation']!r}: attention "
                       f"{self.attention!r} runs on 'auto', "
                       f"{', '.join(map(repr, registry.backends(self.attention)))}")
    return options

  @property
  def block(self) -> BlockConfig:
    return BlockConfig(
        emb_dim=self.emb_dim, num_heads=self.num_heads, qkv_dim=self.qkv_dim,
        mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate, attention=self.attention,
        attention_kwargs=tuple(sorted(self._family_options().items())),
        causal=self.kind == "causal_lm", ff_chunk_size=self.ff_chunk_size,
        positional=self.positional, remat=self.remat, norm=self.norm,
        layer_norm_eps=self.layer_norm_eps, activation=self.activation,
        dtype=DTYPES[self.dtype])


DEFAULTS = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(ModelConfig)}


def _choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"model.{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def model_config(config: Mapping[str, Any]) -> ModelConfig:
  """``ModelConfig`` from a ``config.model`` ConfigDict or dict; unknown keys and wrong
  types raise errors naming the key."""
  values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
  schema.check_section("model", values, DEFAULTS)
  kwargs = values.get("attention_kwargs")
  if kwargs is not None:
    values["attention_kwargs"] = {k: tuple(v) if isinstance(v, list) else v
                                  for k, v in dict(kwargs).items()}
  return ModelConfig(**values)

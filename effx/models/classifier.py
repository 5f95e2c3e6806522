"""LRA classification models: a single-sequence ``Classifier`` and the two-document
``DualEncoderClassifier`` (LRA Retrieval)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from effx.common import axes
from effx.layers.stack import Stack
from effx.models.config import ModelConfig
from effx.models.embedding import Embedder


def pool(x: jax.Array, mask: jax.Array, how: str) -> jax.Array:
  """``[batch, length, d] -> [batch, d]``: the first position (``"cls"``: the prepended
  CLS vector; ``"first"``: the first input token), or the mean over real tokens."""
  if how in ("cls", "first"):
    return x[:, 0]
  weights = mask.astype(x.dtype)[..., None]
  return jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


class Encoder(nn.Module):
  """Embeddings -> dropout -> layer stack -> pooled vector (L2-normalised with
  ``config.normalize``). ``__call__(tokens, train=False, token_types=None)`` returns
  ``(pooled, aux)``; ``aux`` as for ``Classifier``. It is the model of
  ``kind="encoder"`` (sentence embeddings, ``effx.pretrained``)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False,
               token_types: jax.Array | None = None):
    cfg = self.config
    x, mask, positions = Embedder(cfg, with_cls=cfg.pool == "cls", name="embed")(
        tokens, token_types=token_types)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not train)
    y, aux = Stack(cfg.block, cfg.num_layers, cfg.reversible, name="encoder")(
        x, mask, not train, positions)
    pooled = pool(y, mask, cfg.pool)
    if cfg.normalize:  # as torch's F.normalize: x / max(|x|, 1e-12)
      pooled32 = pooled.astype(jnp.float32)
      norm = jnp.linalg.norm(pooled32, axis=-1, keepdims=True)
      pooled = (pooled32 / jnp.maximum(norm, 1e-12)).astype(pooled.dtype)
    return pooled, {"embedded": x, **aux, "final": y, "mask": mask, "pooled": pooled}


class MlpHead(nn.Module):
  """``Dense(hidden) -> relu -> Dense(num_classes)`` (the LRA classifier head)."""

  hidden: int
  num_classes: int

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    x = nn.Dense(self.hidden, name="hidden",
                 kernel_init=nn.with_logical_partitioning(init, (axes.EMBED, axes.MLP)),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.MLP,)))(x)
    return nn.Dense(self.num_classes, name="logits", dtype=jnp.float32,
                    kernel_init=nn.with_logical_partitioning(init, (axes.MLP, None)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(
                        nn.relu(x))


class Classifier(nn.Module):
  """Tokens -> class logits. ``__call__(inputs, train=False) -> (logits, aux)``;
  ``aux`` holds ``embedded``, per-layer ``hidden`` and ``attention`` outputs (leading
  layer axis), ``final``, ``mask`` and ``pooled``."""

  config: ModelConfig

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool = False):
    cfg = self.config
    pooled, aux = Encoder(cfg, name="encoder")(inputs, train)
    logits = MlpHead(cfg.classifier_dim or cfg.mlp_dim, cfg.num_classes, name="head")(pooled)
    return logits, aux


class DualEncoderClassifier(nn.Module):
  """Two documents through one shared encoder; ``[u, v, u*v, u-v]`` -> MLP -> logits
  (Tay et al. 2020, LRA Sec. 3.3). ``__call__(inputs, inputs2, train=False)``."""

  config: ModelConfig

  @nn.compact
  def __call__(self, inputs: jax.Array, inputs2: jax.Array, train: bool = False):
    cfg = self.config
    encoder = Encoder(cfg, name="encoder")
    u, aux1 = encoder(inputs, train)
    v, aux2 = encoder(inputs2, train)
    features = jnp.concatenate([u, v, u * v, u - v], axis=-1)
    logits = MlpHead(cfg.classifier_dim or cfg.mlp_dim, cfg.num_classes, name="head")(features)
    return logits, {"first": aux1, "second": aux2, "features": features}

"""Models built from ``config.model``: ``build(config.model)`` returns the Linen module.

* ``Classifier`` (``kind="classifier"``): ListOps, Text, Image, Pathfinder, Path-X.
* ``DualEncoderClassifier`` (``kind="dual_encoder"``): Retrieval.
* ``CausalLM`` (``kind="causal_lm"``): byte-level LM, optional segment memory.
* ``Encoder`` (``kind="encoder"``): the pooled vector itself (sentence embeddings;
  ``effx.pretrained`` loads BERT-family checkpoints into it).

All take integer tokens ``[batch, length]`` with padding id 0 and return
``(logits, aux)``.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn

from effx.models.causal_lm import CausalLM
from effx.models.classifier import Classifier, DualEncoderClassifier, Encoder, pool
from effx.models.config import ModelConfig, model_config

_KINDS = {"classifier": Classifier, "dual_encoder": DualEncoderClassifier,
          "causal_lm": CausalLM, "encoder": Encoder}


def build(config: Mapping[str, Any] | ModelConfig) -> nn.Module:
  """The Linen model for ``config`` (a ``config.model`` ConfigDict, dict or
  ``ModelConfig``); bad keys, types or combinations raise before anything is traced."""
  cfg = config if isinstance(config, ModelConfig) else model_config(config)
  return _KINDS[cfg.kind](cfg)


__all__ = ["build", "model_config", "ModelConfig", "Classifier", "DualEncoderClassifier",
           "CausalLM", "Encoder", "pool"]

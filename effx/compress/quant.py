"""Quantization with qwix: quantization-aware training in the one loop, integer export.

``config.quant`` (``mode="none"``: off):

* ``mode="qat"``: the model is trained (and evaluated) with fake-quantized weights and
  activations, gradients straight through (qwix's ``QtProvider``). The parameters stay
  float and keep the float model's tree, so a QAT run resumes, distils and prunes as any
  other run.
* ``mode="int"``: a checkpoint of integers and scales written by ``python -m
  effx.quantize`` (qwix's ``PtqProvider``); evaluation only. Its matmuls run as integer
  dots (s8 x s8 -> s32 on CPU) when activations are quantized too.

``weight_qtype`` (``"int8"`` | ``"int4"``), ``act_qtype`` (``"int8"`` | ``"none"``:
weight-only, dequantized before the dot), ``tile_size`` (0: one scale per output
channel; else sub-channel scales over tiles of the innermost contraction axis, which it
must divide). Activation scales are dynamic (computed per call). ``include`` and
``exclude`` are regular expressions matched against whole Flax module paths (e.g.
``encoder/encoder/layers/block/attention_block/attention/query``): by default every
projection, feed-forward and head matmul is quantized and the attention families' own
contractions (scores, feature maps, ``mixer``) stay float.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import qwix

from effx.common import axes, schema
from effx.compress.part import Part

MODES = ("none", "qat", "int")
WEIGHT_QTYPES = {"int8": jnp.int8, "int4": jnp.int4}
ACT_QTYPES = {"int8": jnp.int8, "none": None}
QTYPE_BITS = {"int8": 8, "int4": 4}
DEFAULTS = dict(mode="none", weight_qtype="int8", act_qtype="int8", tile_size=0,
                include=".*", exclude=".*/mixer(/.*)?")


def defaults() -> ml_collections.ConfigDict:
  """``config.quant`` at its defaults (off)."""
  return ml_collections.ConfigDict(dict(DEFAULTS))


def rules(quant: Any) -> list[qwix.QuantizationRule]:
  """qwix rules of ``config.quant``, in precedence order: ``exclude`` (no quantization)
  first, then ``include``."""
  out = []
  if quant["exclude"]:
    out.append(qwix.QuantizationRule(module_path=quant["exclude"]))
  out.append(qwix.QuantizationRule(
      module_path=quant["include"], weight_qtype=WEIGHT_QTYPES[quant["weight_qtype"]],
      act_qtype=ACT_QTYPES[quant["act_qtype"]], tile_size=quant["tile_size"] or None))
  return out


def provider(quant: Any) -> qwix.QuantizationProvider | None:
  """The qwix provider of ``config.quant`` (None when ``mode="none"``)."""
  if quant["mode"] == "qat":
    return qwix.QtProvider(rules(quant))
  if quant["mode"] == "int":
    return qwix.PtqProvider(rules(quant))
  return None


def wrap(model: nn.Module, quant: Any) -> nn.Module:
  """``model`` with its matmuls intercepted by ``config.quant``'s provider (unchanged when
  quantization is off)."""
  chosen = provider(quant)
  return model if chosen is None else qwix.quantize_model(model, chosen)


class Quantization(Part):
  """``config.quant`` in a run: the model's matmuls go through qwix (fake-quantized in
  QAT, integer in an export, which is evaluated only and never trains)."""

  def __init__(self, section):
    self.section = section
    if section["mode"] == "int":
      self.training_error = ("config.quant.mode='int' is an integer export (python -m "
                             "effx.quantize) for evaluation; train with mode 'none' or "
                             "'qat' and export after")

  def wrap_model(self, model: nn.Module) -> nn.Module:
    return wrap(model, self.section)


def check_model(quant: Any, model_config) -> None:
  """Raises when ``config.quant`` cannot apply to this model: a ``tile_size`` that does
  not divide a quantized contraction, or the reversible stack (whose layers run outside
  Flax's module context, where qwix cannot see them)."""
  if quant["mode"] == "none":
    return
  if model_config.reversible:
    raise ValueError("config.quant needs model.reversible=False: the reversible stack runs "
                     "its layers outside Flax's module context, where qwix cannot quantize")
  tile = quant["tile_size"]
  if tile:
    head_dim = model_config.qkv_dim // model_config.num_heads
    classifier = model_config.classifier_dim or model_config.mlp_dim
    sizes = {"model.emb_dim": model_config.emb_dim, "head dim (qkv_dim / num_heads)": head_dim,
             "model.mlp_dim": model_config.mlp_dim, "classifier width": classifier}
    bad = {k: v for k, v in sizes.items() if v % tile}
    if bad:
      raise ValueError(f"quant.tile_size={tile} must divide every quantized contraction: "
                       + ", ".join(f"{k}={v}" for k, v in bad.items())
                       + "; use a common divisor, or 0 for per-channel scales")


def quantize_params(float_params, abstract_params):
  """Integer parameters: each leaf that ``abstract_params`` (the ``mode="int"`` model's
  abstract parameters, e.g. ``jax.eval_shape`` of its init) holds as a quantized
  ``WithAux`` is quantized as it says; other leaves are copied. Layer-stacked leaves
  (``.../layers/...``) are quantized layer by layer: qwix records how to quantize a
  scanned kernel at its per-layer shape."""
  abstract = {axes.path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(
      abstract_params, is_leaf=_is_quantized)[0]}

  def convert(path, leaf):
    target = abstract.get(axes.path_name(path))
    if not _is_quantized(target):
      return leaf
    how = target.how

    def one(x):
      return qwix.quantize(x, how.qtype, channelwise_axes=how.channelwise_axes,
                           tiled_axes=how.tiled_axes,
                           calibration_method=how.calibration_method)

    array = jax.vmap(one)(leaf) if axes.stacked_over_layers(path) else one(leaf)
    return target.replace(array=array)

  return jax.tree_util.tree_map_with_path(convert, float_params)


def _is_quantized(x) -> bool:
  return hasattr(x, "how") and hasattr(x, "array")


def size_bytes(params) -> int:
  """Bytes of ``params`` counted from bit widths: integer values at their qtype's bits
  (int4 packs two per byte, which ``.nbytes`` does not show), scales and float leaves at
  their dtype's size."""
  total = 0.0
  for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, qwix.QArray)):
    if isinstance(leaf, qwix.QArray):
      bits = 4 if leaf.qtype == jnp.int4 else np.dtype(leaf.qvalue.dtype).itemsize * 8
      total += leaf.qvalue.size * bits / 8 + leaf.scale.size * leaf.scale.dtype.itemsize
      if leaf.zero_point is not None:
        total += leaf.zero_point.size * leaf.zero_point.dtype.itemsize
    else:
      total += np.size(leaf) * np.dtype(leaf.dtype).itemsize
  return int(np.ceil(total))


def check(section: Mapping[str, Any]) -> None:
  """``config.quant``: keys, types, and values that cannot work."""
  schema.check_section("quant", section, DEFAULTS)
  values = {**DEFAULTS, **dict(section)}
  if values["mode"] not in MODES:
    raise ValueError(f"quant.mode={values['mode']!r}; one of {', '.join(MODES)}")
  if values["weight_qtype"] not in WEIGHT_QTYPES:
    raise ValueError(f"quant.weight_qtype={values['weight_qtype']!r}; one of "
                     f"{', '.join(WEIGHT_QTYPES)}")
  if values["act_qtype"] == "int4":
    raise ValueError("quant.act_qtype='int4': 4-bit activations are not supported (w4a4 "
                     "does not compile on XLA:CPU); use act_qtype='int8' or 'none' "
                     "(weight-only)")
  if values["act_qtype"] not in ACT_QTYPES:
    raise ValueError(f"quant.act_qtype={values['act_qtype']!r}; one of "
                     f"{', '.join(ACT_QTYPES)}")
  if values["tile_size"] < 0:
    raise ValueError(f"quant.tile_size={values['tile_size']} must be >= 0 (0: per channel)")
  schema.check_regexes("quant", values, ("include", "exclude"))
  if values["mode"] == "none":
    changed = [k for k, default in DEFAULTS.items() if values[k] != default]
    if changed:
      raise ValueError(f"{', '.join('quant.' + k for k in changed)} set but quant.mode is "
                       "'none': set quant.mode='qat' (or export with effx.quantize), or "
                       "leave the quant section at its defaults")

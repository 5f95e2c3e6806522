"""A tiny BERT checkpoint in Hugging Face's folder format, written by the tests (random
weights, a 40-word WordPiece vocabulary), and an independent numpy forward pass of it."""

import json
import math
import os

import numpy as np

WORDS = ["the", "a", "man", "is", "play", "##ing", "guitar", "dog", "cat", "runs", "fast",
         "slow", "music", "and", "on", "in", "of", "to", "##s", "red", "blue", "big", "small",
         "house", "tree", ".", ",", "!", "?", "1", "2", "3", "x", "y"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIAL + WORDS
SIZES = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
             max_position_embeddings=24, type_vocab_size=2)


def write_tokenizer(path, vocab=VOCAB):
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors  # noqa

  tokenizer = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)},
                                         unk_token="[UNK]"))
  tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))])
  tokenizer.save(str(path))


def tiny_weights(seed=0, prefix="bert.", **sizes):
  """HF BERT weight names -> random arrays (torch layout: Linear weights [out, in])."""
  s = {**SIZES, **sizes}
  rng = np.random.default_rng(seed)
  d, ff = s["hidden_size"], s["intermediate_size"]

  def r(*shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)

  w = {"embeddings.word_embeddings.weight": r(len(VOCAB), d),
       "embeddings.position_embeddings.weight": r(s["max_position_embeddings"], d),
       "embeddings.token_type_embeddings.weight": r(s["type_vocab_size"], d),
       "embeddings.LayerNorm.weight": 1 + r(d, scale=0.1),
       "embeddings.LayerNorm.bias": r(d, scale=0.1),
       "pooler.dense.weight": r(d, d), "pooler.dense.bias": r(d)}
  for i in range(s["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    for name in ("query", "key", "value"):
      w[p + f"attention.self.{name}.weight"] = r(d, d)
      w[p + f"attention.self.{name}.bias"] = r(d, scale=0.1)
    w[p + "attention.output.dense.weight"] = r(d, d)
    w[p + "attention.output.dense.bias"] = r(d, scale=0.1)
    w[p + "attention.output.LayerNorm.weight"] = 1 + r(d, scale=0.1)
    w[p + "attention.output.LayerNorm.bias"] = r(d, scale=0.1)
    w[p + "intermediate.dense.weight"] = r(ff, d)
    w[p + "intermediate.dense.bias"] = r(ff, scale=0.1)
    w[p + "output.dense.weight"] = r(d, ff)
    w[p + "output.dense.bias"] = r(d, scale=0.1)
    w[p + "output.LayerNorm.weight"] = 1 + r(d, scale=0.1)
    w[p + "output.LayerNorm.bias"] = r(d, scale=0.1)
  return {prefix + k: v for k, v in w.items()}


def write_folder(folder, *, config=None, weights=None, pooling="mean", normalize=True,
                 tokenizer=True, max_seq_length=None):
  """A BERT folder: config.json, model.safetensors, tokenizer.json and (for
  sentence-transformers folders) 1_Pooling/config.json and modules.json."""
  from safetensors.numpy import save_file  # noqa: PLC0415

  os.makedirs(folder, exist_ok=True)
  values = dict(model_type="bert", architectures=["BertModel"], hidden_act="gelu",
                layer_norm_eps=1e-12, vocab_size=len(VOCAB), pad_token_id=0,
                position_embedding_type="absolute", **SIZES)
  values.update(config or {})
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(values, f)
  save_file(weights if weights is not None else tiny_weights(),
            os.path.join(folder, "model.safetensors"))
  if tokenizer:
    write_tokenizer(os.path.join(folder, "tokenizer.json"))
  if pooling is not None:
    os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
    with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
      json.dump({"word_embedding_dimension": SIZES["hidden_size"],
                 "pooling_mode_cls_token": pooling == "cls",
                 "pooling_mode_mean_tokens": pooling == "mean",
                 "pooling_mode_max_tokens": pooling == "max"}, f)
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    if normalize:
      modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                      "type": "sentence_transformers.models.Normalize"})
    with open(os.path.join(folder, "modules.json"), "w") as f:
      json.dump(modules, f)
  if max_seq_length is not None:
    with open(os.path.join(folder, "sentence_bert_config.json"), "w") as f:
      json.dump({"max_seq_length": max_seq_length, "do_lower_case": False}, f)
  return str(folder)


def numpy_bert(weights, ids, token_types=None, *, pooling="mean", normalize=True,
               eps=1e-12, heads=SIZES["num_attention_heads"]):
  """BERT's encoder and sentence-transformers' pooling, from the paper's definitions, in
  float64 numpy: ``ids [batch, length]`` (0: padding) -> ``[batch, hidden]``."""
  w = {k.removeprefix("bert."): np.asarray(v, np.float64) for k, v in weights.items()}
  ids = np.asarray(ids)
  mask = ids != 0
  types = np.zeros_like(ids) if token_types is None else np.asarray(token_types)
  erf = np.vectorize(math.erf)

  def ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w[p + ".weight"] + w[p + ".bias"]

  def linear(x, p):
    return x @ w[p + ".weight"].T + w[p + ".bias"]

  x = (w["embeddings.word_embeddings.weight"][ids]
       + w["embeddings.position_embeddings.weight"][np.arange(ids.shape[1])]
       + w["embeddings.token_type_embeddings.weight"][types])
  x = ln(x, "embeddings.LayerNorm")
  b, n, d = x.shape
  i = 0
  while f"encoder.layer.{i}.output.dense.weight" in w:
    p = f"encoder.layer.{i}."
    q, k, v = (linear(x, p + f"attention.self.{m}").reshape(b, n, heads, -1)
               for m in ("query", "key", "value"))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask[:, None, None, :], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ctx = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, d)
    x = ln(x + linear(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
    h = linear(x, p + "intermediate.dense")
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    x = ln(x + linear(h, p + "output.dense"), p + "output.LayerNorm")
    i += 1
  if pooling == "mean":
    out = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  else:
    out = x[:, 0]
  if normalize:
    out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
  return out

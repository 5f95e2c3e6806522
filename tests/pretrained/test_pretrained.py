"""effx.pretrained: BERT-family folders loaded without torch, checked against an
independent numpy BERT (a tiny random checkpoint the tests write), against golden vectors
of all-MiniLM-L6-v2 made by sentence-transformers, and against sentence-transformers
itself where torch is installed; attention swaps, the embed CLI and bad folders."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effx import models, pretrained
from effx.pretrained import embed
from effx.attention import registry
from tiny_bert import VOCAB, numpy_bert, tiny_weights, write_folder

GOLDEN = pathlib.Path(__file__).parent / "golden_minilm.json"
TEXTS = ["The man is playing the guitar.", "a dog runs fast!", "big red house , small tree",
         "music", "", "cats and dogs on 3 trees ?", "x y x y x y x y x y x y x y x y x y x y"]


def _minilm_folder():
  try:
    return pretrained.default_folder()
  except pretrained.PretrainedError as error:
    pytest.fail(f"{error} (README's install command installs it)")


@pytest.fixture(scope="module")
def minilm():
  return pretrained.load(_minilm_folder())


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False)])
def test_tiny_bert_matches_numpy_oracle(tmp_path, pooling, normalize):
  weights = tiny_weights(seed=3)
  folder = write_folder(tmp_path / "m", weights=weights, pooling=pooling, normalize=normalize)
  loaded = pretrained.load(folder)
  assert loaded.config.norm == "post" and loaded.config.activation == "gelu"
  assert loaded.config.pool == ("mean" if pooling == "mean" else "first")
  tokens = loaded.tokens(TEXTS)
  expected = numpy_bert(weights, tokens, pooling=pooling, normalize=normalize)
  np.testing.assert_allclose(loaded.embed(TEXTS, batch_size=3), expected, atol=1e-5, rtol=0)
  # bfloat16 computation (float32 parameters): within 1e-3 of the oracle's direction.
  half = pretrained.load(folder, dtype="bfloat16").embed(TEXTS, batch_size=3)
  cos = np.sum(half * expected, -1) / np.linalg.norm(half, axis=-1) / np.linalg.norm(
      expected, axis=-1)
  assert cos.min() > 1 - 1e-3, cos
  # Token types index the type table (the oracle's, with type 1 on the second half).
  types = np.zeros_like(tokens)
  types[:, tokens.shape[1] // 2:] = 1
  apply = jax.jit(lambda p, t, tt: loaded.model.apply({"params": p}, t, token_types=tt)[0])
  got = apply(loaded.params, jnp.asarray(tokens), jnp.asarray(types))
  np.testing.assert_allclose(got, numpy_bert(weights, tokens, types, pooling=pooling,
                                             normalize=normalize), atol=1e-5, rtol=0)


def test_embedding_does_not_depend_on_the_other_texts(tmp_path):
  # Positions up to 64: texts pad to 32 or 64 tokens, so both lengths are batched.
  folder = write_folder(tmp_path / "m", config={"max_position_embeddings": 64},
                        weights=tiny_weights(max_position_embeddings=64))
  loaded = pretrained.load(folder)
  texts = TEXTS + [" ".join(["music"] * 40)]
  assert {len(r) > 32 for r in loaded.tokenizer.ids(texts)} == {True, False}
  together = loaded.embed(texts, batch_size=2)
  alone = np.stack([loaded.embed([t])[0] for t in texts[:2] + texts[-1:]])
  np.testing.assert_allclose(together[[0, 1, -1]], alone, atol=1e-6, rtol=0)


def test_minilm_tokenizer_and_golden_vectors(minilm):
  golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
  assert golden["command"].startswith("python experiments/pretrained_reference.py")
  assert minilm.tokenizer.max_length == golden["max_seq_length"] == 256
  assert minilm.tokenizer.ids(golden["sentences"]) == golden["input_ids"]
  got = minilm.embed(golden["sentences"], batch_size=4)
  np.testing.assert_allclose(got, np.asarray(golden["embeddings"], np.float32), atol=1e-5,
                             rtol=0)
  assert minilm.config.num_layers == 6 and minilm.config.emb_dim == 384


def test_minilm_against_sentence_transformers(minilm):
  pytest.importorskip("torch")
  st = pytest.importorskip("sentence_transformers")
  reference = st.SentenceTransformer(_minilm_folder(), device="cpu")
  texts = TEXTS + ["Efficient attention keeps the pretrained weights.", "Ünïcödé façade"]
  expected = reference.encode(texts, convert_to_numpy=True)
  np.testing.assert_allclose(minilm.embed(texts), expected, atol=1e-5, rtol=0)
  assert minilm.tokenizer.ids(texts) == [reference.tokenizer(t)["input_ids"] for t in texts]


OWN_PARAMETERS = ("sinkhorn", "linformer", "synthesizer", "adaptive_span")  # at their defaults


@pytest.mark.slow  # a training run from a BERT checkpoint
def test_swap_keeps_the_checkpoint_and_names_what_is_fresh(tiny_bert):
  dense = pretrained.load(tiny_bert)
  dense_flat = dict(jax.tree_util.tree_flatten_with_path(dense.params)[0])
  for family in registry.names():
    swapped = pretrained.load(tiny_bert, family)
    flat = dict(jax.tree_util.tree_flatten_with_path(swapped.params)[0])
    for path, value in dense_flat.items():  # every checkpoint weight, unchanged
      np.testing.assert_array_equal(flat[path], value)
    extra = sorted(jax.tree_util.keystr(p) for p in flat if p not in dense_flat)
    if family in OWN_PARAMETERS:
      assert extra and all("'mixer'" in name for name in extra), (family, extra)
      assert len(swapped.fresh) == len(extra), family
    elif family == "routing":
      assert not extra and swapped.fresh == [
          "state/encoder/layers/block/attention_block/attention/mixer/centroids"]
    else:
      assert not extra and not swapped.fresh, family
  # Families exact at this length give dense attention's embeddings.
  for family, kwargs in (("blockwise", {"q_chunk": 8, "k_chunk": 8}), ("local", {"window": 24})):
    np.testing.assert_allclose(pretrained.load(tiny_bert, family, kwargs).embed(TEXTS),
                               dense.embed(TEXTS), atol=1e-5, rtol=0)
  local = pretrained.load(tiny_bert, "local", {"window": 2}).embed(TEXTS)
  assert np.abs(local - dense.embed(TEXTS)).max() > 1e-3  # a real swap


def test_embed_cli_writes_npy_and_jsonl_and_keeps_existing_files(tiny_bert, tmp_path):
  source = tmp_path / "texts.txt"
  source.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
  out = embed.embed_file(str(source), model=tiny_bert, attention="local",
                         attention_kwargs={"window": 4}, batch_size=4)
  assert out == str(tmp_path / "texts.npy")
  expected = pretrained.load(tiny_bert, "local", {"window": 4}).embed(TEXTS)
  np.testing.assert_allclose(np.load(out), expected, atol=1e-6, rtol=0)
  with pytest.raises(FileExistsError, match="--overwrite"):
    embed.embed_file(str(source), model=tiny_bert)
  jsonl = embed.embed_file(str(source), str(tmp_path / "e.jsonl"), model=tiny_bert)
  rows = [json.loads(line) for line in open(jsonl, encoding="utf-8")]
  assert [r["text"] for r in rows] == TEXTS and len(rows[0]["embedding"]) == 16
  (tmp_path / "empty.txt").write_text("", encoding="utf-8")
  with pytest.raises(ValueError, match="is empty"):
    embed.embed_file(str(tmp_path / "empty.txt"), model=tiny_bert)
  with pytest.raises(ValueError, match=r"\.npy or \.jsonl"):
    embed.embed_file(str(source), str(tmp_path / "e.csv"), model=tiny_bert)
  # Rows are the file's lines: a form feed inside a text does not split it.
  (tmp_path / "ff.txt").write_bytes("a dog\x0c runs\r\nmusic\n\nthe end".encode())
  assert embed.read_lines(str(tmp_path / "ff.txt")) == ["a dog\x0c runs", "music", "",
                                                        "the end"]


def _variant(tmp_path, **kwargs):
  return write_folder(tmp_path / "bad", **kwargs)


def _drop(weights, key):
  return {k: v for k, v in weights.items() if k != key}


BAD_FOLDERS = {
    "model_type": (dict(config={"model_type": "roberta"}), "model_type='roberta' is not"),
    "positions": (dict(config={"position_embedding_type": "relative_key"}),
                  "only 'absolute'"),
    "activation": (dict(config={"hidden_act": "swish"}), "hidden_act='swish'"),
    "pad": (dict(config={"pad_token_id": 1}), "padding id must be 0"),
    "shape": (dict(config={"intermediate_size": 48}), "weights and config.json disagree"),
    "layers": (dict(config={"num_hidden_layers": 3}), "has no weight 'encoder.layer.2"),
    "missing": (dict(weights=_drop(tiny_weights(), "bert.encoder.layer.1.output.dense.bias")),
                "has no weight 'encoder.layer.1.output.dense.bias'"),
    "extra": (dict(weights={**tiny_weights(), "bert.encoder.layer.2.output.dense.bias":
                            np.zeros(16, np.float32)}), "does not have: encoder.layer.2"),
    "vocab": (dict(config={"vocab_size": 20},
                   weights={**tiny_weights(), "bert.embeddings.word_embeddings.weight":
                            np.zeros((20, 16), np.float32)}),
              f"has {len(VOCAB)} tokens but the model's embedding table has 20 rows"),
    "pooling": (dict(pooling="max"), "pooling_mode_mean_tokens or pooling_mode_cls_token"),
    "tokenizer": (dict(tokenizer=False), "tokenizer.json not found"),
}


def test_sentence_transformers_modules_effx_cannot_reproduce_are_refused(tmp_path):
  folder = _variant(tmp_path)
  with open(os.path.join(folder, "modules.json")) as f:
    modules = json.load(f)
  modules.append({"idx": 3, "name": "3", "path": "3_Dense",
                  "type": "sentence_transformers.models.Dense"})
  with open(os.path.join(folder, "modules.json"), "w") as f:
    json.dump(modules, f)
  with pytest.raises(pretrained.PretrainedError, match=r"modules \['Dense'\]"):
    pretrained.load(folder)
  folder = write_folder(tmp_path / "lower")
  with open(os.path.join(folder, "sentence_bert_config.json"), "w") as f:
    json.dump({"max_seq_length": 16, "do_lower_case": True}, f)
  with pytest.raises(pretrained.PretrainedError, match="do_lower_case"):
    pretrained.load(folder)


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folders_get_one_clear_message(tmp_path, case):
  kwargs, message = BAD_FOLDERS[case]
  folder = _variant(tmp_path, **kwargs)
  with pytest.raises(pretrained.PretrainedError, match=message):
    pretrained.load(folder)


def test_missing_files_and_bad_requests(tmp_path, tiny_bert):
  with pytest.raises(pretrained.PretrainedError, match="does not exist"):
    pretrained.load(str(tmp_path / "nowhere"))
  folder = _variant(tmp_path)
  os.remove(os.path.join(folder, "model.safetensors"))
  with pytest.raises(pretrained.PretrainedError, match="model.safetensors not found"):
    pretrained.load(folder)
  with open(os.path.join(folder, "model.safetensors"), "wb") as f:
    f.write(b"not safetensors")
  with pytest.raises(pretrained.PretrainedError, match="not a readable safetensors"):
    pretrained.load(folder)
  os.remove(os.path.join(folder, "config.json"))
  with pytest.raises(pretrained.PretrainedError, match="config.json not found"):
    pretrained.load(folder)
  with pytest.raises(pretrained.PretrainedError, match=r"max_length=99 must be .* \[2, 24\]"):
    pretrained.load(tiny_bert, max_length=99)
  with pytest.raises(ValueError, match="unknown attention family 'nope'"):
    pretrained.load(tiny_bert, "nope")
  with pytest.raises(ValueError, match="window"):
    pretrained.load(tiny_bert, "local", {"window": 0})


@pytest.mark.parametrize("overrides,message", [
    (dict(norm="post", reversible=True), "cannot be inverted"),
    (dict(kind="causal_lm", norm="post"), "pre-norm blocks only"),
    (dict(normalize=True), "model.kind='encoder'"),
    (dict(norm="middle"), "model.norm='middle'"),
    (dict(activation="swish"), "model.activation='swish'"),
    (dict(layer_norm_eps=0.0), "model.layer_norm_eps"),
    (dict(type_vocab_size=-1), "model.type_vocab_size"),
])
def test_bert_model_options_reject_bad_values(overrides, message):
  with pytest.raises(ValueError, match=message):
    models.model_config(dict(vocab_size=16, max_len=8, emb_dim=16, num_heads=2, qkv_dim=16,
                             mlp_dim=16, **overrides))


def test_token_types_need_a_table():
  config = models.model_config(dict(kind="encoder", vocab_size=16, max_len=8, emb_dim=16,
                                    num_heads=2, qkv_dim=16, mlp_dim=16, pool="mean"))
  model = models.build(config)
  tokens = jnp.ones((1, 8), jnp.int32)
  with pytest.raises(ValueError, match="type_vocab_size=0"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens,
                                      token_types=jnp.zeros_like(tokens)))

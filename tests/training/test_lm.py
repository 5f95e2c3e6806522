"""Language modelling in the one training loop: streams, bits per byte, segment memory
carried across steps (and checkpoints), corpora and their errors."""

import json
import math
import shutil
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from effx import data as data_lib
from effx.training import metrics, objectives, loop as trainer, validate
from effx import models
from effx.data import lm
from effx.layers.memory import empty_memory, reset_memory
from conftest import tiny_config


def test_token_loss_and_bpb_by_hand():
  logits = jnp.array([[[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]]])
  targets = jnp.array([[2, 1, 0]])  # the last position has no target
  weights = jnp.array([0.5])
  sums = objectives.token_sums(logits, targets, weights)

  def nll(row, t):
    return math.log(sum(math.exp(v) for v in row)) - row[t]
  expected = 0.5 * (nll([2.0, 0.0, 1.0], 2) + nll([0.0, 3.0, 0.0], 1))
  assert float(sums["loss"]) == pytest.approx(expected, rel=1e-6)
  assert float(sums["count"]) == 1.0 and float(sums["correct"]) == 0.5
  out = objectives.LanguageModel.eval_metrics({k: float(v) for k, v in sums.items()})
  assert out["bpb"] == pytest.approx(expected / math.log(2), rel=1e-6)
  assert out["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)


def _documents():
  rng = np.random.default_rng(0)
  return [bytes(rng.integers(32, 127, n, dtype=np.uint8)) for n in (2, 17, 9, 40, 5)]


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_streams_deal_every_prediction_once_in_order(rows):
  docs, seq = _documents(), 4
  streams = lm.Corpus(docs, seq).streams(rows)
  assert len(streams) == streams.steps * rows
  pairs, starts = [], []
  for row in range(rows):
    for step in range(streams.steps):
      ex = streams[step * rows + row]
      assert ex["inputs"].shape == ex["targets"].shape == (seq,)
      live = ex["targets"] > 0
      n = int(live.sum())
      assert live[:n].all() and (ex["inputs"][n:] == 0).all()  # padding only at the end
      if ex["reset"] and n:
        starts.append(len(pairs))
      pairs += list(zip(ex["inputs"][:n] - 1, ex["targets"][:n] - 1))
  # Rows in order hold every (byte, next byte) pair of every document, in order, once.
  expected = [(a, b) for d in docs for a, b in zip(d[:-1], d[1:])]
  assert pairs == expected
  doc_starts = np.cumsum([0] + [len(d) - 1 for d in docs[:-1]]).tolist()
  assert set(doc_starts) <= set(starts)  # memory is emptied at every document


def test_reset_marks_document_starts_and_rows():
  streams = lm.Corpus([b"abcdefghij", b"xyz"], 3).streams(2)  # 3 + 1 segments
  resets = [[bool(streams[s * 2 + r]["reset"]) for s in range(streams.steps)]
            for r in range(2)]
  assert streams.steps == 2
  assert resets == [[True, False], [True, True]]  # row 1: the rest of doc 0, then doc 1
  assert streams[1]["inputs"].tolist() == [ord(c) + 1 for c in "ghi"]


def test_reset_memory_empties_only_the_marked_rows():
  memory = jax.tree.map(lambda x: np.asarray(x) + 1, empty_memory(3, 2, 4, 5, 2))
  out = jax.tree.map(np.asarray, reset_memory(memory, jnp.array([False, True, False])))
  empty = jax.tree.map(np.asarray, empty_memory(3, 2, 4, 5, 2))
  for name in memory:
    axis = 1 if name in ("hidden", "compressed") else 0
    np.testing.assert_array_equal(np.take(out[name], 1, axis), np.take(empty[name], 1, axis))
    np.testing.assert_array_equal(np.take(out[name], 0, axis), np.take(memory[name], 0, axis))


def test_memory_is_emptied_at_a_document_start():
  """With reset set, a segment's loss is the loss it has from empty memory."""
  model = models.build(dict(kind="causal_lm", vocab_size=20, max_len=16, num_layers=1,
                            emb_dim=8, num_heads=2, qkv_dim=8, mlp_dim=16,
                            positional="rotary", mem_len=8, dropout_rate=0.0))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 2, 8), 1, 20)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), tokens[0])["params"]
  objective = objectives.LanguageModel(
      model, lambda b: empty_memory(b, 1, 8, 8))
  eval_sums = jax.jit(objective.eval_sums)  # one compilation, not one per operation

  def batch(i, reset):
    return {"inputs": tokens[i], "targets": jnp.roll(tokens[i], -1, 1),
            "reset": jnp.array(reset), "weights": jnp.ones(2)}
  fresh, _ = eval_sums(params, {}, batch(1, [True, True]),
                                 objective.eval_carry(2))
  _, carry = eval_sums(params, {}, batch(0, [True, True]), objective.eval_carry(2))
  carried, _ = eval_sums(params, {}, batch(1, [False, False]), carry)
  reset, _ = eval_sums(params, {}, batch(1, [True, True]), carry)
  assert float(reset["loss"]) == pytest.approx(float(fresh["loss"]), rel=1e-6)
  assert abs(float(carried["loss"]) - float(fresh["loss"])) > 1e-4  # memory was used


def _lm_config(**overrides):
  return tiny_config("lm_enwik8", **overrides)


@pytest.mark.slow  # a straight and a resumed training run
def test_lm_with_memory_resumes_exactly(tmp_path):
  """Memory is part of the state: a run resumed at step 6 ends where an uninterrupted
  one does, bit for bit."""
  config = _lm_config(num_train_steps=12, checkpoint_every_steps=6, eval_every_steps=6)
  trainer.train_and_evaluate(config, str(tmp_path / "a"))
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "12")  # as if killed after step 6's
  trainer.train_and_evaluate(config, str(tmp_path / "b"))
  rows = {w: [(r["split"], r["step"], r.get("loss")) for r in metrics.read(str(tmp_path / w))]
          for w in "ab"}
  assert sorted(rows["a"], key=str) == sorted(rows["b"], key=str)
  a, b = (json.loads((tmp_path / w / "results.json").read_text()) for w in "ab")
  assert b["sessions"][-1]["start_step"] == 6
  assert a["test_bpb"] == b["test_bpb"] and a["final_train_loss"] == b["final_train_loss"]
  assert a["test_bpb"] < 8.0  # below a uniform guess over 257 ids
  state = ocp.StandardCheckpointer().restore(tmp_path / "b" / "checkpoints" / "12" / "state")
  hidden = state["model_state"]["memory"]["hidden"]
  assert float(np.abs(hidden).sum()) > 0  # a non-trivial memory was checkpointed


def test_mqar_trains_through_the_same_loop(tmp_path):
  config = tiny_config("mqar", num_train_steps=4, eval_every_steps=4,
                       checkpoint_every_steps=4)
  results = trainer.train_and_evaluate(config, str(tmp_path))
  assert "test_accuracy" in results and 0.0 <= results["test_accuracy"] <= 1.0


def _hutter_zip(folder, name, size=lm.HUTTER_BYTES):
  block = (b"<page>effx " * 100)[:1000]
  with zipfile.ZipFile(folder / f"{name}.zip", "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr(name, block * (size // 1000) + block[:size % 1000])


def test_hutter_files_split_90_5_5(tmp_path):
  _hutter_zip(tmp_path, "enwik8")
  task = lm.load({"corpus": "enwik8", "dir": str(tmp_path), "seq_len": 1000}, 0)
  assert [task.splits[s].num_bytes for s in ("train", "validation", "test")] == [
      90_000_000, 5_000_000, 5_000_000]
  first = task.splits["validation"].streams(1)[0]
  assert bytes((first["inputs"][:6] - 1).astype(np.uint8)) == b"<page>"
  assert task.kind == "lm" and task.ordered and task.vocab_size == 257


def test_builtin_corpus_is_real_text_split_by_bytes():
  task = lm.load({"corpus": "builtin"}, 0)
  sizes = {s: task.splits[s].num_bytes for s in ("train", "validation", "test")}
  total = sum(len(d) for d in lm.builtin_documents())
  assert sum(sizes.values()) == total
  assert abs(sizes["validation"] - 0.05 * total) <= 1 and total > 100_000
  assert len(lm.corpus_digest()) == 64


@pytest.mark.parametrize("data,error,match", [
    ({"corpus": "enwik9"}, ValueError, "data.corpus='enwik9' is not one of"),
    ({"corpus": "builtin", "dir": "/x"}, ValueError, "reads no files"),
    ({"corpus": "enwik8"}, ValueError, "needs data.dir"),
    ({"corpus": "builtin", "seq_len": 0}, ValueError, "data.seq_len=0"),
])
def test_bad_data_settings(data, error, match):
  with pytest.raises(error, match=match):
    data_lib.check_config({"task": "lm", **data})


def test_missing_or_short_hutter_file(tmp_path):
  with pytest.raises(data_lib.DatasetMissingError, match="neither text8 nor text8.zip"):
    lm.load({"corpus": "text8", "dir": str(tmp_path)}, 0)
  (tmp_path / "text8").write_bytes(b"abc")
  with pytest.raises(ValueError, match="has 3 bytes; text8 has 100,000,000"):
    lm.load({"corpus": "text8", "dir": str(tmp_path)}, 0)


@pytest.mark.parametrize("overrides,match", [
    ({"grad_accum_steps": 2}, "grad_accum_steps=2 with segment memory"),
    ({"model.kind": "classifier"}, "needs model.kind='causal_lm'"),
    ({"model.positional": "learned"}, "positional='learned' cannot index"),
])
def test_bad_lm_configs(overrides, match):
  with pytest.raises(ValueError, match=match):
    validate.config(_lm_config(**overrides))

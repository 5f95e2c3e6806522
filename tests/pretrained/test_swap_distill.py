"""A pretrained encoder with a swapped attention family, distilled back toward the
original in the one training loop: the sentences task, the encoder objective against an
independent cosine, the whole run on a tiny checkpoint, and bad configs."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effx import cli, pretrained
from effx.compress import distill
from effx.training import loop as trainer
from effx.training import objectives
from effx.data import sentences
from tiny_bert import SPECIAL, WORDS, write_folder, write_tokenizer
from support import set_keys

CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "pretrained_swap.py"
TEXTS = ["the man is playing the guitar .", "a dog runs fast !", "big red house , small tree",
         "music and the cat", "cats on 3 trees ?", "x y x y", "the blue house is big .",
         "a small dog and a big cat", "music on the tree", "the red guitar ."]


def test_builtin_sentences_are_prose_split_80_10_10():
  splits = sentences.builtin_splits()
  sizes = {k: len(v) for k, v in splits.items()}
  total = sum(sizes.values())
  assert total > 1000
  assert abs(sizes["validation"] - total / 10) <= 1 and abs(sizes["test"] - total / 10) <= 1
  everything = [s for split in splits.values() for s in split]
  assert not any(">>>" in s or "::=" in s for s in everything)
  assert all(6 <= len(s.split()) <= 50 and s[-1] in ".!?:" for s in everything)
  assert splits == sentences.builtin_splits()  # deterministic


def test_sentences_task_reads_text_files_with_the_models_tokenizer(tiny_bert, tmp_path):
  for split in ("train", "validation", "test"):
    (tmp_path / f"{split}.txt").write_text("\n".join(TEXTS) + "\n\n", encoding="utf-8")
  task = sentences.load({"task": "sentences", "dir": str(tmp_path), "tokenizer": tiny_bert,
                         "max_len": 8, "min_words": 6}, seed=0)
  assert task.kind == "embedding" and task.max_len == 8 and task.num_classes == 0
  assert len(task.splits["test"]) == len(TEXTS)
  long_ids = pretrained.load(tiny_bert).tokenizer.ids(TEXTS[:1])[0]
  ids = pretrained.load(tiny_bert, max_length=8).tokenizer.ids(TEXTS[:1])[0]
  assert len(long_ids) > 8 and ids == long_ids[:7] + [long_ids[-1]]  # ... [SEP] kept
  assert task.splits["test"][0]["inputs"].tolist() == ids
  (tmp_path / "test.txt").unlink()
  with pytest.raises(FileNotFoundError, match="no test.txt"):
    sentences.load({"task": "sentences", "dir": str(tmp_path), "tokenizer": tiny_bert,
                    "max_len": 8, "min_words": 6}, seed=0)


def _embeddings(loaded, tokens):
  return jax.jit(loaded.model.apply)({"params": loaded.params}, jnp.asarray(tokens))[0]


def test_encoder_objective_is_the_mean_cosine_to_the_teacher(tiny_bert):
  teacher = pretrained.load(tiny_bert)
  student = pretrained.load(tiny_bert, "local", {"window": 1})
  options = cli.load_config(str(CONFIG) + ":" + tiny_bert).distill
  objective = objectives.Distillation(
      student.model, teacher.model, distill.Losses(options, (0, 1), 4, embedding=True))
  tokens = teacher.tokens(TEXTS[:4])
  batch = {"inputs": jnp.asarray(tokens), "targets": jnp.zeros(4, jnp.int32),
           "weights": jnp.asarray([1.0, 1.0, 1.0, 0.0])}
  extra = {"params": teacher.params, "model_state": {}}
  # Jitted here and below: one compilation instead of one per operation.
  sums, _ = jax.jit(objective.eval_sums)(student.params, {}, batch, None, extra)
  s = np.asarray(_embeddings(student, tokens), np.float64)
  t = np.asarray(_embeddings(teacher, tokens), np.float64)
  cos = (s * t).sum(-1) / np.linalg.norm(s, axis=-1) / np.linalg.norm(t, axis=-1)
  np.testing.assert_allclose(float(sums["cosine"]), cos[:3].sum(), rtol=1e-5)
  assert float(sums["count"]) == 3.0
  metrics = objective.eval_metrics(jax.device_get(sums))
  np.testing.assert_allclose(metrics["cosine"], cos[:3].mean(), rtol=1e-5)
  loss, (values, _) = jax.jit(objective.loss)(student.params, {}, batch,
                                              jax.random.PRNGKey(0), extra)
  for key in ("cosine", "attention", "hidden", "value_relation"):
    assert np.isfinite(float(values[key])), key
  np.testing.assert_allclose(float(values["cosine"]), cos.mean(), rtol=1e-5)
  assert float(loss) > 0


def _config(folder, data_dir, **overrides):
  config = cli.load_config(f"{CONFIG}:{folder}")
  config.data.update(dir=str(data_dir), max_len=16)
  config.update(dict(batch_size=4, num_train_steps=6, eval_every_steps=3,
                     checkpoint_every_steps=3, log_every_steps=3, warmup_steps=1,
                     learning_rate=3e-3))
  return set_keys(config, overrides)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("texts")
  for split in ("train", "validation", "test"):
    (folder / f"{split}.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
  return folder


@pytest.mark.slow  # a distillation run from a BERT teacher
def test_swapped_student_distils_toward_the_teacher(tiny_bert, text_dir, tmp_path):
  # The dense student initialised from the teacher is the teacher: cosine 1.
  run = trainer.Run(_config(tiny_bert, text_dir))
  params, kept = distill.init_student(run.init_state().params, run.teacher.variables["params"],
                                      run.objective.layer_map)
  assert not kept
  assert run.evaluate(params, {}, "test")["cosine"] > 1 - 1e-6
  config = _config(tiny_bert, text_dir, **{"model.attention": "local",
                                           "model.attention_kwargs": {"window": 1}})
  swapped = pretrained.load(tiny_bert, "local", {"window": 1}, max_length=16)
  teacher = pretrained.load(tiny_bert, max_length=16)
  tokens = teacher.tokens(TEXTS)
  tokens = np.pad(tokens, ((0, 0), (0, 16 - tokens.shape[1])))  # the task's padding
  s, t = _embeddings(swapped, tokens), _embeddings(teacher, tokens)
  before = float(np.mean(np.sum(np.asarray(s) * np.asarray(t), -1)))  # both L2-normalised
  result = trainer.train_and_evaluate(config, str(tmp_path / "local"))
  assert result["test_cosine"] > before + 0.01
  record = json.loads((tmp_path / "local" / "teacher.json").read_text())
  assert record["workdir"] == tiny_bert and record["best_step"] == 0


@pytest.mark.parametrize("overrides,message", [
    ({"distill.kd_weight": 1.0}, "has neither logits nor labels"),
    ({"distill.embedding_weight": 0.0, "distill.hidden_weight": 0.0,
      "distill.attention_weight": 0.0, "distill.value_relation_weight": 0.0},
     "every loss weight of the sentence encoder is 0"),
    ({"distill.teacher_workdir": "/tmp/x"}, "both name a teacher"),
    ({"distill.teacher_model": ""}, "set but no teacher"),
    ({"model.norm": "pre"}, r"model.norm='pre' \(teacher 'post'\)"),
    ({"data.max_len": 64}, "exceeds model.max_len=24"),
    ({"model.kind": "classifier"}, "needs model.kind='encoder'"),
])
def test_bad_swap_configs_get_one_clear_message(tiny_bert, text_dir, overrides, message):
  with pytest.raises(ValueError, match=message):
    trainer.Run(_config(tiny_bert, text_dir, **overrides))


def test_data_must_be_tokenized_by_the_teachers_tokenizer(tiny_bert, text_dir, tmp_path):
  other = write_folder(tmp_path / "other")
  write_tokenizer(os.path.join(other, "tokenizer.json"), SPECIAL + WORDS[::-1])
  with pytest.raises(ValueError, match="is not the teacher's tokenizer"):
    trainer.Run(_config(tiny_bert, text_dir, **{"data.tokenizer": other}))

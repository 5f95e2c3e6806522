"""Distillation in the one training loop: the losses against hand computations, the
teacher kept out of the student's state, student initialisation, resume, bad input."""

import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import ml_collections

from effx import cli, models
from effx import data as data_lib
from effx.compress import distill
from effx.training import loop as trainer
from effx.training import objectives, teachers, validate
from conftest import CONFIGS, tiny_config


def _model(**overrides):
  config = dict(kind="classifier", vocab_size=16, max_len=24, num_classes=10, num_layers=2,
                emb_dim=16, num_heads=2, qkv_dim=16, mlp_dim=32, dropout_rate=0.0,
                attention_dropout_rate=0.0, pool="cls")
  config.update(overrides)
  model_config = models.model_config(config)
  return model_config, models.build(model_config)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(1, 16, size=(3, 24)).astype(np.int32)
  inputs[1, 15:] = 0  # padding
  return {"inputs": jnp.asarray(inputs), "targets": jnp.asarray([1, 7, 3], jnp.int32)}


def _options(**weights):
  values = {**distill.DEFAULTS, "teacher_workdir": "x", "kd_weight": 0.0, "ce_weight": 0.0}
  values.update(weights)
  return ml_collections.ConfigDict(values)


def _distillation(student, teacher, options, layer_map, relation_heads=1, embedding=False):
  losses = distill.Losses(options, layer_map, relation_heads, embedding=embedding)
  return objectives.Distillation(student, teacher, losses)


def _loss(objective, params, model_state, batch, rng, extra):
  # Jitted, as the training step runs it: one compilation instead of one per operation.
  return jax.jit(objective.loss)(params, model_state, batch, rng, extra)


def _apply(model, params, inputs):
  return jax.jit(model.apply)({"params": params}, inputs)


def _init(model, seed):
  # Jitted: one compilation instead of one per operation.
  return jax.jit(model.init)(jax.random.PRNGKey(seed), _batch()["inputs"])["params"]


def _shapes(model):
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), _batch()["inputs"])["params"]


def test_kd_loss_is_hintons_with_t_squared():
  _, student = _model()
  _, teacher = _model(num_layers=3)
  s_params, t_params = _init(student, 0), _init(teacher, 1)
  batch = _batch()
  objective = _distillation(student, teacher, _options(kd_weight=1.0, temperature=3.0),
                                   (0, 2), relation_heads=1)
  loss, (values, _) = _loss(objective, s_params, {}, batch, jax.random.PRNGKey(5),
                                     {"params": t_params, "model_state": {}})
  s = np.asarray(_apply(student, s_params, batch["inputs"])[0], np.float64)
  t = np.asarray(_apply(teacher, t_params, batch["inputs"])[0], np.float64)

  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  log_p_s, log_p_t = log_softmax(s / 3.0), log_softmax(t / 3.0)
  expected = 9.0 * np.mean(np.sum(np.exp(log_p_t) * (log_p_t - log_p_s), axis=-1))
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(values["kd"]) == pytest.approx(expected, rel=1e-5)
  ce = -np.mean(log_softmax(s)[np.arange(3), np.asarray(batch["targets"])])
  assert float(values["ce"]) == pytest.approx(ce, rel=1e-5)


@pytest.mark.parametrize("hidden_loss", ["mse", "cosine"])
def test_every_loss_is_zero_when_the_student_is_the_teacher(hidden_loss):
  _, model = _model()
  params = _init(model, 0)
  objective = _distillation(
      model, model, _options(kd_weight=1.0, hidden_weight=1.0, attention_weight=1.0,
                             value_relation_weight=1.0, attention_kl_weight=1.0,
                             hidden_loss=hidden_loss), (0, 1), relation_heads=2)
  loss, (values, _) = _loss(objective, params, {}, _batch(), jax.random.PRNGKey(0),
                                     {"params": params, "model_state": {}})
  for name in ("kd", "hidden", "attention", "value_relation", "attention_kl"):
    assert abs(float(values[name])) < 1e-5, (name, values)
  assert abs(float(loss)) < 1e-5


def test_hidden_loss_is_a_mean_over_real_tokens():
  _, model = _model()
  params = _init(model, 0)
  objective = _distillation(model, model, _options(hidden_weight=1.0), (0, 1),
                                   relation_heads=1)
  batch = _batch()
  other = jax.tree.map(lambda x: x * 1.5, params)
  _, (values, _) = _loss(objective, other, {}, batch, jax.random.PRNGKey(0),
                                  {"params": params, "model_state": {}})
  s_h = _apply(model, other, batch["inputs"])[1]
  t_h = _apply(model, params, batch["inputs"])[1]
  sq = np.mean(np.square(np.asarray(s_h["hidden"]) - np.asarray(t_h["hidden"])), axis=-1)
  mask = np.asarray(s_h["mask"], np.float64)
  expected = np.sum(sq * mask[None]) / (mask.sum() * 2)
  assert float(values["hidden"]) == pytest.approx(expected, rel=1e-5)


def test_uniform_layer_map():
  assert distill.uniform_layer_map(2, 4) == (1, 3)
  assert distill.uniform_layer_map(3, 6) == (1, 3, 5)
  assert distill.uniform_layer_map(1, 2) == (1,)
  assert distill.uniform_layer_map(2, 2) == (0, 1)
  assert distill.uniform_layer_map(3, 4) == (0, 1, 3)


def test_student_starts_from_the_teachers_mapped_layers():
  _, student = _model(num_layers=2, attention="local", attention_kwargs={"window": 4})
  _, teacher = _model(num_layers=4)
  s_params, t_params = _init(student, 0), _init(teacher, 1)
  params, kept = distill.init_student(s_params, t_params, (1, 3))
  assert kept == []  # a parameter-free family: the same tree as dense
  flat_s = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_t = dict(jax.tree_util.tree_flatten_with_path(t_params)[0])
  for path, leaf in flat_s:
    source = np.asarray(flat_t[path])
    if any(getattr(k, "key", None) == "layers" for k in path):
      source = source[[1, 3]]
    np.testing.assert_array_equal(np.asarray(leaf), source, err_msg=str(path))
  # The student's shapes are all that is read for these two.
  _, wider = _model(num_layers=2, mlp_dim=64)
  with pytest.raises(ValueError, match="mlp.*same widths"):
    distill.init_student(_shapes(wider), t_params, (1, 3))
  _, linformer = _model(num_layers=2, attention="linformer", attention_kwargs={"k": 8})
  _, kept = distill.init_student(_shapes(linformer), t_params, (1, 3))
  assert kept and all("attention" in name for name in kept)


def _student(teacher, **overrides):
  return tiny_config("lra_listops", **{"num_train_steps": 10,
                                       "distill.teacher_workdir": str(teacher), **overrides})


# Every loss on, a one-layer student started from the teacher's mapped layer.
OPTIONS = {"distill.hidden_weight": 0.5, "distill.attention_weight": 0.5,
           "distill.value_relation_weight": 0.5, "distill.attention_kl_weight": 0.5,
           "distill.init_from_teacher": True, "model.num_layers": 1, "num_train_steps": 20}


@pytest.fixture(scope="module")
def student_run(listops_run, tmp_path_factory):
  """A finished 20-step student (``OPTIONS``) of the two-layer ``listops_run``, with
  checkpoints at 10 and 20; tests copy it before they resume it."""
  workdir = tmp_path_factory.mktemp("student") / "straight"
  trainer.train_and_evaluate(_student(listops_run, **OPTIONS), str(workdir))
  return workdir


@pytest.mark.slow  # a teacher run, a straight and a resumed student run
def test_distilled_student_trains_resumes_exactly_and_holds_no_teacher(
    listops_run, student_run, tmp_path):
  straight = json.loads((student_run / "results.json").read_text())
  # As if killed after the checkpoint of step 10: resume from it.
  shutil.copytree(student_run, tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "20")
  resumed = trainer.train_and_evaluate(_student(listops_run, **OPTIONS),
                                       str(tmp_path / "resumed"))
  assert resumed["sessions"][-1]["start_step"] == 10
  assert straight["final_train_loss"] == resumed["final_train_loss"]
  a = ocp.StandardCheckpointer().restore(student_run / "checkpoints" / "20" / "state")
  b = ocp.StandardCheckpointer().restore(tmp_path / "resumed" / "checkpoints" / "20" / "state")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  # The checkpoint holds the one-layer student only.
  layer_leaves = [v for p, v in jax.tree_util.tree_flatten_with_path(a["params"])[0]
                  if "layers" in jax.tree_util.keystr(p)]
  assert layer_leaves and all(v.shape[0] == 1 for v in layer_leaves)
  record = json.loads((student_run / "teacher.json").read_text())
  assert record["workdir"] == str(listops_run) and len(record["params_sha256"]) == 64
  rows = [json.loads(line) for line in (student_run / "metrics.jsonl").open()]
  train = [r for r in rows if r["split"] == "train"]
  assert {"kd", "ce", "hidden", "attention", "value_relation", "attention_kl",
          "accuracy"} <= set(train[0])


def test_a_changed_teacher_is_refused_on_resume(listops_run, student_run, tmp_path):
  workdir = shutil.copytree(student_run, tmp_path / "student")
  record = tmp_path / "student" / "teacher.json"
  values = json.loads(record.read_text())
  record.write_text(json.dumps({**values, "params_sha256": "0" * 64}))
  with pytest.raises(ValueError, match="not the one this run was distilled from"):
    trainer.train_and_evaluate(_student(listops_run, **{**OPTIONS, "num_train_steps": 22}),
                               str(workdir))


def _teacher_of(config):
  """What ``trainer.Run`` does with a config's teacher (``teachers.setup``: load it and
  check it against the student), on the task's sizes: no data is read and no student
  state is built."""
  validate.config(config)
  task = data_lib.describe(config.data, config.seed)
  model_config = validate.model(config, task)
  return teachers.setup(config, task, model_config, models.build(model_config))


def test_bad_teachers_and_options_say_what_is_wrong(listops_run, tmp_path):
  with pytest.raises(FileNotFoundError, match="no such folder"):
    trainer.Run(_student(tmp_path / "nowhere"))  # as the loop meets it
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="not an effx.train workdir"):
    _teacher_of(_student(tmp_path / "empty"))
  teacher = listops_run  # two layers, two heads, emb 32, dense
  objective, loaded = _teacher_of(_student(teacher))
  assert loaded.step == 30 and objective.layer_map == (1,)  # the good pair passes
  with pytest.raises(ValueError, match="other data: data.num_train=500 .student: 200"):
    _teacher_of(_student(teacher, **{"data.num_train": 200}))
  pathfinder = tiny_config("lra_pathfinder", **{"distill.teacher_workdir": str(teacher)})
  with pytest.raises(ValueError, match="data.task='listops'; the student's task is"):
    _teacher_of(pathfinder)
  with pytest.raises(ValueError, match="needs equal model.emb_dim"):
    _teacher_of(_student(teacher, **{"distill.hidden_weight": 1.0, "model.emb_dim": 16,
                                     "model.qkv_dim": 16}))
  with pytest.raises(ValueError, match="the student's model.attention='performer' has none"):
    _teacher_of(_student(teacher, **{"distill.attention_kl_weight": 1.0,
                                     "model.attention": "performer"}))
  with pytest.raises(ValueError, match="teacher has model.num_heads=2, the student 1"):
    _teacher_of(_student(teacher, **{"distill.attention_kl_weight": 1.0,
                                     "model.num_heads": 1}))
  with pytest.raises(ValueError, match="relation_heads=3 must divide both"):
    _teacher_of(_student(teacher, **{"distill.value_relation_weight": 1.0,
                                     "distill.relation_heads": 3}))
  with pytest.raises(ValueError, match="relation_heads=2 set but distill.value_relation_weight "
                                       "is 0"):
    _teacher_of(_student(teacher, **{"distill.relation_heads": 2}))
  with pytest.raises(ValueError, match="reversible stack does not expose"):
    _teacher_of(_student(teacher, **{"distill.value_relation_weight": 1.0,
                                     "model.reversible": True}))
  with pytest.raises(ValueError, match="layer_map=.5,. must give one teacher layer"):
    _teacher_of(_student(teacher, **{"distill.layer_map": (5,), "model.num_layers": 1}))
  with pytest.raises(ValueError, match="distill.kd_weight set but no teacher: set "
                                       "distill.teacher_workdir"):
    validate.config(tiny_config("lra_listops", **{"distill.kd_weight": 2.0}))
  with pytest.raises(ValueError, match="distill.hidden_loss='l1'"):
    validate.config(_student(teacher, **{"distill.hidden_loss": "l1"}))
  with pytest.raises(ValueError, match="distill.teacher_workdir is not set"):
    validate.config(cli.load_config(f"{CONFIGS}/distill_listops.py:tiny"))


def _heads_by_hand(params, aux, which):
  """Each layer's projected ``which`` (query/key/value) heads ``[layers, b, l, h, d]``,
  recomputed in NumPy from the parameters: LayerNorm of the layer's input, then the
  projection."""
  p = jax.tree.map(np.asarray, nn.unbox(params))["encoder"]["encoder"]["layers"]["block"]
  p = p["attention_block"]
  inputs = [np.asarray(aux["embedded"], np.float64)] + [
      np.asarray(h, np.float64) for h in aux["hidden"][:-1]]
  out = []
  for i, x in enumerate(inputs):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    h = (x - mean) / np.sqrt(var + 1e-6) * p["norm"]["scale"][i] + p["norm"]["bias"][i]
    proj = p["attention"][which]
    out.append(np.einsum("bld,dhk->blhk", h, proj["kernel"][i]) + proj["bias"][i])
  return np.stack(out)


def _kl_by_hand(t_logits, s_logits, mask):
  """Mean over real queries (and layers, heads) of KL(softmax t || softmax s) over real keys."""
  total, count = 0.0, 0
  for n, b, h, q in np.ndindex(*t_logits.shape[:4]):
    if not mask[b, q]:
      continue
    keys = mask[b]
    t, s = t_logits[n, b, h, q, keys], s_logits[n, b, h, q, keys]
    pt = np.exp(t - t.max()) / np.exp(t - t.max()).sum()
    ps = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    total += np.sum(pt * (np.log(pt) - np.log(ps)))
    count += 1
  return total / count


def test_value_relation_is_minilms_kl_across_widths_and_head_counts():
  # Teacher: 3 layers, 2 heads of 8; student: 1 layer, 1 head of 12 -> 4 relation heads
  # of 4 (teacher) and 3 (student) features.
  _, student = _model(num_layers=1, num_heads=1, qkv_dim=12, emb_dim=8, mlp_dim=16)
  _, teacher = _model(num_layers=3)
  s_params, t_params = _init(student, 0), _init(teacher, 1)
  batch = _batch()
  objective = _distillation(student, teacher, _options(value_relation_weight=1.0),
                                   (2,), relation_heads=4)
  loss, (values, _) = _loss(objective, s_params, {}, batch, jax.random.PRNGKey(0),
                                     {"params": t_params, "model_state": {}})
  s_aux = _apply(student, s_params, batch["inputs"])[1]
  t_aux = _apply(teacher, t_params, batch["inputs"])[1]
  mask = np.asarray(s_aux["mask"])

  def relation(v):  # [n, b, l, h, d] -> [n, b, 4, l, l]
    v = v.reshape(*v.shape[:3], 4, -1)
    return np.einsum("nbqhd,nbkhd->nbhqk", v, v) / np.sqrt(v.shape[-1])

  t_v = _heads_by_hand(t_params, t_aux, "value")[[2]]
  s_v = _heads_by_hand(s_params, s_aux, "value")
  expected = _kl_by_hand(relation(t_v), relation(s_v), mask)
  assert expected > 1e-3
  assert float(values["value_relation"]) == pytest.approx(expected, rel=1e-4)
  assert float(loss) == pytest.approx(expected, rel=1e-4)


def test_attention_kl_is_the_kl_of_the_softmax_attention_maps():
  _, student = _model(num_layers=1, qkv_dim=8)
  _, teacher = _model(num_layers=2)
  s_params, t_params = _init(student, 0), _init(teacher, 1)
  batch = _batch(3)
  objective = _distillation(student, teacher, _options(attention_kl_weight=1.0), (1,),
                                   relation_heads=1)
  _, (values, _) = _loss(objective, s_params, {}, batch, jax.random.PRNGKey(0),
                                  {"params": t_params, "model_state": {}})
  s_aux = _apply(student, s_params, batch["inputs"])[1]
  t_aux = _apply(teacher, t_params, batch["inputs"])[1]

  def logits(params, aux, layers):
    q = _heads_by_hand(params, aux, "query")[layers]
    k = _heads_by_hand(params, aux, "key")[layers]
    return np.einsum("nbqhd,nbkhd->nbhqk", q, k) / np.sqrt(q.shape[-1])

  expected = _kl_by_hand(logits(t_params, t_aux, [1]), logits(s_params, s_aux, [0]),
                         np.asarray(s_aux["mask"]))
  assert expected > 1e-3
  assert float(values["attention_kl"]) == pytest.approx(expected, rel=1e-4)

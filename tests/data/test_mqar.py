"""MQAR: every target checked by an independent oracle, determinism, the batch contract
and the config errors."""

import ml_collections
import numpy as np
import pytest

from effx.data import mqar

SMALL = dict(num_pairs=5, vocab_size=40, length=32, num_train=30, num_valid=7, num_test=9)


def _oracle(inputs, targets, n, vocab_size):
  """Checks one example against the layout, written from the spec, not the module."""
  length = len(inputs)
  first_value = 2 + (vocab_size - 2) // 2
  keys, values = inputs[0:2 * n:2], inputs[1:2 * n:2]
  assert (inputs > 0).all() and inputs.max() < vocab_size
  assert ((keys >= 2) & (keys < first_value)).all()
  assert ((values >= first_value) & (values < vocab_size)).all()
  assert len(set(keys.tolist())) == n and len(set(values.tolist())) == n
  lookup = {}
  for p in range(0, 2 * n, 2):  # the value is the token right after its key
    lookup[int(inputs[p])] = int(inputs[p + 1])
  scored = np.flatnonzero(targets)
  assert len(scored) == n
  assert sorted(int(inputs[p]) for p in scored) == sorted(lookup)  # each key queried once
  for p in scored:
    assert p >= 2 * n and (p - 2 * n) % 2 == 0 and p + 1 < length
    assert targets[p] == lookup[int(inputs[p])]
    assert inputs[p + 1] == targets[p]  # the answer follows the query in inputs
  rest = np.ones(length, bool)
  rest[:2 * n] = False
  rest[scored] = rest[scored + 1] = False
  assert (inputs[rest] == 1).all()  # everything else in the query region is filler


@pytest.mark.parametrize("settings", [
    SMALL,
    dict(SMALL, num_pairs=8, length=32),                # query region exactly full
    dict(SMALL, num_pairs=3, vocab_size=8, length=13),  # smallest vocabulary, odd length
    {},                                                 # the defaults
])
def test_examples_match_oracle(settings):
  task = mqar.load(settings, seed=3)
  n, vocab_size = ({**mqar.DEFAULTS, **settings}[k] for k in ("num_pairs", "vocab_size"))
  for source in task.splits.values():
    for i in range(min(len(source), 50)):
      item = source[i]
      _oracle(item["inputs"], item["targets"], n, vocab_size)


def test_batch_contract_and_sizes():
  task = mqar.load(ml_collections.ConfigDict(SMALL), seed=0)
  assert (task.kind, task.ordered, task.dual) == ("lm", False, False)
  assert (task.vocab_size, task.num_classes, task.max_len) == (40, 0, 32)
  assert {k: len(v) for k, v in task.splits.items()} == {
      "train": 30, "validation": 7, "test": 9}
  item = task.splits["validation"][6]
  assert set(item) == {"inputs", "targets", "reset"}
  for key in ("inputs", "targets"):
    assert item[key].shape == (32,) and item[key].dtype == np.int32
  assert item["reset"].shape == () and item["reset"].dtype == np.bool_ and item["reset"]
  with pytest.raises(IndexError):
    task.splits["validation"][7]
  assert len(list(task.splits["test"])) == 9


def test_defaults_are_typed_and_valid():
  assert all(type(v) is int and v > 0 for v in mqar.DEFAULTS.values())
  mqar.check({"dir": None, **mqar.DEFAULTS})


def _arrays(task, split, i):
  item = task.splits[split][i]
  return np.concatenate([item["inputs"], item["targets"]])


def test_deterministic_by_seed_split_and_index():
  a, b, c = mqar.load(SMALL, seed=1), mqar.load(SMALL, seed=1), mqar.load(SMALL, seed=2)
  for split in ("train", "validation", "test"):
    for i in (0, 6):
      np.testing.assert_array_equal(_arrays(a, split, i), _arrays(b, split, i))
  # read out of order: example i does not depend on what was read before it
  np.testing.assert_array_equal(_arrays(a, "train", 5), _arrays(mqar.load(SMALL, 1), "train", 5))
  differ = lambda x, y: not np.array_equal(x, y)  # noqa: E731
  assert all(differ(_arrays(a, "train", i), _arrays(c, "train", i)) for i in range(5))
  assert all(differ(_arrays(a, "train", i), _arrays(a, "test", i)) for i in range(5))
  assert all(differ(_arrays(a, "validation", i), _arrays(a, "test", i)) for i in range(5))
  assert all(differ(_arrays(a, "train", i), _arrays(a, "train", i + 1)) for i in range(5))


def test_queries_cover_the_region():
  """Slots are uniform, so over many examples every even offset of the region is used."""
  task = mqar.load(dict(SMALL, num_train=200), seed=0)
  used = set()
  for i in range(200):
    used |= set(np.flatnonzero(task.splits["train"][i]["targets"]).tolist())
  assert used == set(range(10, 32, 2))


@pytest.mark.parametrize("overrides, match", [
    (dict(length=19), r"data\.length=19 .*>= 20"),
    (dict(vocab_size=11), r"data\.vocab_size=11 .*>= 12"),
    (dict(num_pairs=0), r"data\.num_pairs=0 must be positive"),
    (dict(num_pairs=-2), r"data\.num_pairs=-2 must be positive"),
    (dict(num_train=0), r"data\.num_train=0 must be positive"),
    (dict(length=32.0), r"data\.length=32\.0 must be an int"),
    (dict(dir="/data/mqar"), r"data\.dir='/data/mqar'.*generated"),
])
def test_bad_settings_name_the_key(overrides, match):
  with pytest.raises(ValueError, match=match):
    mqar.load({**SMALL, **overrides}, seed=0)
  mqar.load({**SMALL, **{k: mqar.DEFAULTS.get(k) for k in overrides}}, seed=0)  # key alone


def test_smallest_valid_settings_load():
  task = mqar.load(dict(SMALL, num_pairs=5, vocab_size=12, length=20), seed=0)
  _oracle(task.splits["train"][0]["inputs"], task.splits["train"][0]["targets"], 5, 12)

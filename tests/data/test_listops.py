"""The ListOps generator: deterministic, correct labels, LRA's length/depth statistics."""

import numpy as np
import pytest

from effx.data import listops

NAMES = listops.token_names()


def _value(tokens):
  """A recursive-descent evaluator written from the grammar, independent of effx's."""
  pos = 0

  def node():
    nonlocal pos
    name = NAMES[tokens[pos]]
    pos += 1
    if name.isdigit():
      return int(name), 1
    args, depth = [], 0
    while NAMES[tokens[pos]] != "]":
      value, d = node()
      args.append(value)
      depth = max(depth, d)
    pos += 1
    ops = {"[MIN": min, "[MAX": max, "[MED": lambda a: int(np.floor(np.median(a))),
           "[SM": lambda a: sum(a) % 10}
    return ops[name](args), depth + 1

  value, depth = node()
  assert pos == len(tokens)
  return value, depth


@pytest.fixture(scope="module")
def lra_sample():
  return listops.generate(listops.Settings(num_train=200, num_valid=20, num_test=20, seed=3))


def test_same_seed_same_data_other_seed_other_data():
  s = listops.Settings(min_length=10, max_length=60, num_train=50, num_valid=5, num_test=5)
  a, b = listops.generate(s), listops.generate(s)
  c = listops.generate(listops.Settings(**{**s.__dict__, "seed": 1}))
  for split in a:
    assert all(np.array_equal(x, y) for x, y in zip(a[split][0], b[split][0]))
    np.testing.assert_array_equal(a[split][1], b[split][1])
  assert not all(np.array_equal(x, y) for x, y in zip(a["train"][0], c["train"][0]))


def test_labels_agree_with_independent_evaluator(lra_sample):
  for expressions, labels in lra_sample.values():
    for tokens, label in zip(expressions, labels):
      assert _value(list(tokens))[0] == label
      assert listops.evaluate(tokens) == label


def test_lra_length_and_depth_statistics(lra_sample):
  expressions = [e for split in lra_sample.values() for e in split[0]]
  lengths = np.array([len(e) for e in expressions])
  depths = np.array([_value(list(e))[1] for e in expressions])
  assert len(expressions) == 240
  assert lengths.min() > 500 and lengths.max() < 2000       # strictly between
  assert 700 < lengths.mean() < 1300                         # LRA ListOps: ~1000 on average
  assert depths.max() <= 10 and np.median(depths) >= 8       # deep trees, capped at 10
  assert len({e.tobytes() for e in expressions}) == len(expressions)  # no duplicates
  tokens = np.concatenate(expressions)
  ops = np.bincount(tokens, minlength=16)[11:15]
  assert ops.min() > 0.2 * ops.sum()                          # four operators, ~uniform
  # brackets kept: every operator token has its closing bracket
  assert np.sum(tokens == listops.END) == ops.sum()
  labels = np.concatenate([s[1] for s in lra_sample.values()])
  assert set(labels) <= set(range(10)) and len(set(labels)) == 10


def test_cache_roundtrip(tmp_path):
  s = listops.Settings(min_length=10, max_length=40, num_train=30, num_valid=4, num_test=4)
  first = listops.load(s, tmp_path)
  assert listops.cache_path(s, tmp_path).exists()
  again = listops.load(s, tmp_path)
  for split in first:
    assert all(np.array_equal(x, y) for x, y in zip(first[split][0], again[split][0]))


def test_bad_settings():
  with pytest.raises(ValueError, match="min_length=50 and data.max_length=40"):
    listops.Settings(min_length=50, max_length=40)

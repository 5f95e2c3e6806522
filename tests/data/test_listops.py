"""ListOps: the generator (deterministic, correct labels, LRA's length/depth statistics),
LRA's release files, both tokenizers, and the config errors."""

import pathlib
import re

import ml_collections
import numpy as np
import pytest

from effx import cli, data
from effx.data import listops

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"

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


# LRA's release files, rows exactly as its generator writes them (``csv.writer``: tab
# between Source and Target, \r\n at the end of each row): the operator with its first
# argument, then each further argument and the closing ], wrapped in parentheses.
# (Source, Target, "effx" ids, "lra" ids), ids written out by hand: digit d is d + 1,
# [MIN [MAX [MED [SM are 11..14, ] is 15 ("effx" only).
RELEASE_ROWS = [
    ("( ( ( [MAX 2 ) 9 ) ] )", 9, [12, 3, 10, 15], [12, 3, 10]),
    ("( ( ( [SM ( ( ( [MAX 2 ) 9 ) ] ) ) 4 ) ] )", 3,
     [14, 12, 3, 10, 15, 5, 15], [14, 12, 3, 10, 5]),
    ("( ( ( ( ( [MED ( ( ( [MIN 7 ) 1 ) ] ) ) 5 ) 8 ) 0 ) ] )", 3,
     [13, 11, 8, 2, 15, 6, 9, 1, 15], [13, 11, 8, 2, 6, 9, 1]),
    # [SM [MIN 1 2 ] 9 5 ] = 5 and [SM [MIN 1 2 9 ] 5 ] = 6: the same "lra" tokens
    ("( ( ( ( [SM ( ( ( [MIN 1 ) 2 ) ] ) ) 9 ) 5 ) ] )", 5,
     [14, 11, 2, 3, 15, 10, 6, 15], [14, 11, 2, 3, 10, 6]),
    ("( ( ( [SM ( ( ( ( [MIN 1 ) 2 ) 9 ) ] ) ) 5 ) ] )", 6,
     [14, 11, 2, 3, 10, 15, 6, 15], [14, 11, 2, 3, 10, 6]),
]
RELEASE_SPLITS = {"train": ("basic_train.tsv", [0, 1, 2]),
                  "validation": ("basic_val.tsv", [3]), "test": ("basic_test.tsv", [4])}


def _write_release(root, end="\r\n", **replace):
  """The three release files in ``root``; ``replace`` maps a file name to its lines."""
  for name, rows in RELEASE_SPLITS.values():
    lines = ["Source\tTarget"] + [f"{RELEASE_ROWS[i][0]}\t{RELEASE_ROWS[i][1]}" for i in rows]
    (root / name).write_bytes((end.join(replace.get(name, lines)) + end).encode())
  return root


def _load_release(root, **keys):
  return data.load(ml_collections.ConfigDict({"task": "listops", "dir": str(root), **keys}),
                   seed=0)


@pytest.mark.parametrize("end", ["\r\n", "\n"])
@pytest.mark.parametrize("tokenizer", ["effx", "lra"])
def test_release_files(tmp_path, tokenizer, end):
  task = _load_release(_write_release(tmp_path, end), tokenizer=tokenizer)
  assert (task.vocab_size, task.num_classes, task.max_len) == (16, 10, 2000)
  for split, (_, rows) in RELEASE_SPLITS.items():
    assert len(task.splits[split]) == len(rows)
    for i, row in enumerate(rows):
      _, label, effx_ids, lra_ids = RELEASE_ROWS[row]
      expected = effx_ids if tokenizer == "effx" else lra_ids
      example = task.splits[split][i]
      assert example["inputs"].shape == (2000,) and example["inputs"].dtype == np.int32
      assert example["inputs"][:len(expected)].tolist() == expected
      assert not example["inputs"][len(expected):].any()
      assert int(example["targets"]) == label
      # the release's label is the value effx computes from the "effx" tokens
      assert listops.evaluate(effx_ids) == _value(effx_ids)[0] == label


def test_lra_tokens_lose_the_reading(tmp_path):
  effx_task = _load_release(_write_release(tmp_path))
  lra_task = _load_release(tmp_path, tokenizer="lra")
  a, b = effx_task.splits["validation"][0], effx_task.splits["test"][0]
  assert not np.array_equal(a["inputs"], b["inputs"]) and a["targets"] != b["targets"]
  np.testing.assert_array_equal(lra_task.splits["validation"][0]["inputs"],
                                lra_task.splits["test"][0]["inputs"])


def test_release_length_limit_counts_the_tokenizers_tokens(tmp_path):
  # [SM 1 1 ... 1 ] with 1999 ones: 2001 "effx" tokens, 2000 "lra" tokens
  source = "( " * 2000 + "[SM 1 )" + " 1 )" * 1998 + " ] )"
  lines = ["Source\tTarget", RELEASE_ROWS[0][0] + "\t9", source + "\t9"]
  _write_release(tmp_path, **{"basic_train.tsv": lines})
  with pytest.raises(ValueError, match=r"basic_train.tsv, line 3: 2001 tokens .*at most 2000"):
    _load_release(tmp_path)
  task = _load_release(tmp_path, tokenizer="lra")
  np.testing.assert_array_equal(task.splits["train"][1]["inputs"], [14] + [2] * 1999)


def test_missing_release_file(tmp_path):
  root = tmp_path / "listops-1000"
  root.mkdir()
  (_write_release(root) / "basic_val.tsv").unlink()
  with pytest.raises(data.DatasetMissingError,
                     match=r"basic_val.tsv not found .*lra_release\.gz"):
    _load_release(root)
  with pytest.raises(data.DatasetMissingError, match=r"try data.dir=.*listops-1000"):
    _load_release(tmp_path)  # the folder above: every file missing, and a hint


@pytest.mark.parametrize("line, error", [
    ("( ( ( [MAX 2 ) 9 ) ] )\t12", "Target '12' is not a label 0-9"),
    ("( ( ( [MAX 2 ) 9 ) ] ) 9", "1 tab-separated field(s), expected 2 (Source, Target)"),
    ("( ( ( [MAX 2 ) 19 ) ] )\t9", "unexpected word '19' in Source; expected ( ) [MIN"),
    ("( ( ( [MIX 2 ) 9 ) ] )\t9", "unexpected word '[MIX' in Source"),
    ("( ( ( [MAX 2 ) 9 )\t9", "Source is not one expression; expected an operator"),
    ("( ( ( [MAX 2 ) 9 ) ] ) ] )\t9", "Source is not one expression"),
])
def test_malformed_release_row(tmp_path, line, error):
  lines = ["Source\tTarget", "( ( ( [MAX 2 ) 9 ) ] )\t9", line]
  _write_release(tmp_path, **{"basic_val.tsv": lines})
  with pytest.raises(ValueError, match=re.escape(f"basic_val.tsv, line 3: {error}")):
    _load_release(tmp_path)


def test_release_header_is_checked(tmp_path):
  _write_release(tmp_path, **{"basic_test.tsv": ["Source,Target", "( ( ( [MAX 2 ) 9 ) ] ),9"]})
  with pytest.raises(ValueError, match=re.escape(
      "basic_test.tsv, line 1: expected the header Source<TAB>Target, found 'Source,Target'")):
    _load_release(tmp_path)


def test_generator_keys_with_dir_are_errors(tmp_path):
  with pytest.raises(ValueError, match=r"data.dir is set, so ListOps reads LRA's release "
                     r"files and not the generator settings data.min_length=16, "
                     r"data.cache_dir='/tmp'; unset them"):
    _load_release(_write_release(tmp_path), min_length=16, cache_dir="/tmp")
  with pytest.raises(TypeError, match=r"data.num_train=1.5 must be an int"):
    data.load(ml_collections.ConfigDict({"task": "listops", "num_train": 1.5}), seed=0)


def test_bad_tokenizer():
  with pytest.raises(ValueError, match=r"data.tokenizer='bpe' is not a ListOps tokenizer; "
                     r"use 'effx' .* or 'lra'"):
    data.load(ml_collections.ConfigDict({"task": "listops", "tokenizer": "bpe"}), seed=0)


def test_configs_with_release_dir(tmp_path):
  full, small = (cli.load_config(f"{CONFIGS / 'lra_listops.py'}{size}") for size in ("", ":small"))
  full.data.dir = small.data.dir = str(tmp_path)
  data.check_config(full.data)  # the full config sets no generator key
  with pytest.raises(ValueError, match="data.min_length=16"):
    data.check_config(small.data)


@pytest.mark.parametrize("tokenizer", ["effx", "lra"])
def test_generated_data_in_both_tokenizers(tmp_path, tokenizer):
  keys = {"min_length": 8, "max_length": 40, "num_train": 20, "num_valid": 4, "num_test": 4}
  task = data.load(ml_collections.ConfigDict({"task": "listops", "tokenizer": tokenizer,
                                              "cache_dir": str(tmp_path), **keys}), seed=2)
  expected = listops.generate(listops.Settings(**keys, seed=2))
  assert (task.vocab_size, task.max_len) == (16, 39)
  for split, (expressions, labels) in expected.items():
    for i, (expression, label) in enumerate(zip(expressions, labels)):
      kept = [t for t in expression.tolist() if tokenizer == "effx" or t != 15]
      example = task.splits[split][i]
      assert example["inputs"].tolist() == kept + [0] * (39 - len(kept))
      assert example["targets"] == label

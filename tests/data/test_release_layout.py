"""Pathfinder / Path-X and Retrieval read files laid out exactly as in ``lra_release.gz``.

The expected splits below are what TFDS 4.9 itself gave LRA's keys (a throwaway
``GeneratorBasedBuilder`` yielding ``<k dir>_<file>_<row>`` under split ``easy`` /
``hard``, sliced ``[:80%]``, ``[80%:90%]``, ``[90%:]``), copied in by hand.
"""

import logging
import pathlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from effx import cli, data
from effx.data import pathfinder

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"

# metadata file -> (image folder, [(image number, label)]); 20 rows in three files.
_EASY_ROWS = {
    "0.npy": ("imgs/0", [(168, 1), (169, 0), (170, 1), (171, 0), (172, 1), (173, 0),
                         (174, 1), (175, 0)]),
    "1.npy": ("imgs/1", [(0, 0), (1, 1), (2, 0), (3, 1), (4, 0), (5, 1)]),
    "10.npy": ("imgs/10", [(0, 1), (1, 1), (2, 0), (3, 0), (4, 1), (5, 1)]),
}
# (path, label, pixel at [0, 0]) in LRA's order; imgs/0/sample_172.png is the empty one.
_EASY_TRAIN = [
    ("imgs/0/sample_168.png", 1, 68), ("imgs/0/sample_169.png", 0, 69),
    ("imgs/1/sample_2.png", 0, 102), ("imgs/1/sample_4.png", 0, 104),
    ("imgs/0/sample_170.png", 1, 70), ("imgs/10/sample_3.png", 0, 203),
    ("imgs/10/sample_1.png", 1, 201), ("imgs/10/sample_0.png", 1, 200),
    ("imgs/0/sample_171.png", 0, 71), ("imgs/0/sample_175.png", 0, 75),
    ("imgs/10/sample_5.png", 1, 205), ("imgs/10/sample_2.png", 0, 202),
    ("imgs/1/sample_3.png", 1, 103), ("imgs/1/sample_1.png", 1, 101),
    ("imgs/1/sample_0.png", 0, 100),
]
_EASY_VALIDATION = [("imgs/1/sample_5.png", 1, 105), ("imgs/10/sample_4.png", 1, 204)]
_EASY_TEST = [("imgs/0/sample_173.png", 0, 73), ("imgs/0/sample_174.png", 1, 74)]


def _config(task, **overrides):
  return ml_collections.ConfigDict({**data.defaults(task), **overrides})


def _png(path, size, corner):
  """``size`` x ``size`` grayscale: ``corner`` at [0, 0], 255 at [5, 7], 0 elsewhere."""
  pixels = np.zeros((size, size), np.uint8)
  pixels[0, 0], pixels[5, 7] = corner, 255
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pixels).save(path)


def _release(root, rows, size=32):
  """Writes ``rows`` (see ``_EASY_ROWS``) as text ``metadata/*.npy`` and their PNGs;
  ``imgs/<k>/sample_<n>.png`` has pixel ``n % 100 + {0: 0, 1: 100, 10: 200}[k]`` at [0, 0]."""
  (root / "metadata").mkdir(parents=True)
  for name, (folder, images) in rows.items():
    lines = []
    for n, label in images:
      lines.append(f"{folder} sample_{n}.png {n} {label} 1.0 6 2 2 0.5 1 1\n")
      corner = n % 100 + {"imgs/0": 0, "imgs/1": 100, "imgs/10": 200}[folder]
      _png(root / folder / f"sample_{n}.png", size, corner)
    (root / "metadata" / name).write_text("".join(lines))


@pytest.fixture
def easy32(tmp_path):
  root = tmp_path / "pathfinder32" / "curv_baseline"
  _release(root, _EASY_ROWS)
  (root / "imgs" / "0" / "sample_172.png").write_bytes(b"")  # empty, as in the release
  return tmp_path


def test_pathfinder_splits_are_lras(easy32, caplog):
  root = str(easy32 / "pathfinder32" / "curv_baseline")
  listed = [p for p, _ in pathfinder.release_examples(root, "curv_baseline")]
  assert listed == ([p for p, _, _ in _EASY_TRAIN[:9]] + ["imgs/0/sample_172.png"]
                    + [p for p, _, _ in _EASY_TRAIN[9:] + _EASY_VALIDATION + _EASY_TEST])
  with caplog.at_level(logging.WARNING):
    task = data.load(_config("pathfinder", dir=str(easy32), difficulty="curv_baseline"), 0)
  assert "train: skipping empty image imgs/0/sample_172.png" in caplog.text
  assert (task.max_len, task.vocab_size, task.num_classes) == (1024, 257, 2)
  for split, expected in (("train", _EASY_TRAIN), ("validation", _EASY_VALIDATION),
                          ("test", _EASY_TEST)):
    source = task.splits[split]
    assert len(source) == len(expected)
    for i, (_, label, corner) in enumerate(expected):
      example = source[i]
      assert example["inputs"].dtype == np.int32 and example["inputs"].shape == (1024,)
      assert int(example["targets"]) == label
      # pixel p is token p + 1, row-major: [0, 0] -> 0, [5, 7] -> 5 * 32 + 7
      assert (int(example["inputs"][0]), int(example["inputs"][167])) == (corner + 1, 256)
      assert int(example["inputs"].sum()) == corner + 1 + 256 + 1022


def test_pathx_config_reads_the_hard_128_release(tmp_path):
  root = tmp_path / "pathfinder128" / "curv_contour_length_14"
  _release(root, {"0.npy": ("imgs/0", [(n, n % 2) for n in range(10)])}, size=128)
  config = cli.load_config(f"{CONFIGS}/lra_pathx.py:tiny,dir={tmp_path}")
  task = data.load(config.data, seed=0)
  assert {k: len(v) for k, v in task.splits.items()} == {"train": 8, "validation": 1, "test": 1}
  train = [int(task.splits["train"][i]["inputs"][0]) - 1 for i in range(8)]
  assert train == [8, 7, 6, 9, 0, 1, 5, 4]  # sample_<n> has pixel n at [0, 0]
  assert int(task.splits["validation"][0]["inputs"][0]) - 1 == 3
  example = task.splits["test"][0]  # sample_2
  assert example["inputs"].shape == (128 * 128,) and int(example["targets"]) == 0
  assert int(example["inputs"][5 * 128 + 7]) == 256


def test_pathfinder_metadata_text_quirks(tmp_path):
  root = tmp_path / "pathfinder32" / "curv_contour_length_14"
  _release(root, {"0.npy": ("imgs/0", [(170, 1), (171, 0)])})
  metadata = root / "metadata"
  # a trailing blank line (LRA's builder would fail on it) and no final newline
  (metadata / "0.npy").write_text((metadata / "0.npy").read_text() + "\n")
  _png(root / "imgs" / "1" / "sample_0.png", 32, 50)
  (metadata / "extra.npy").write_text("imgs/1 sample_0.png 0 1 1.0 14 4 2 0.5 1 1")
  examples = pathfinder.release_examples(str(root), "curv_contour_length_14")
  assert sorted(examples) == [("imgs/0/sample_170.png", 1), ("imgs/0/sample_171.png", 0),
                              ("imgs/1/sample_0.png", 1)]
  (metadata / "extra.npy").write_text("imgs/1 sample_0.png 0\n")
  with pytest.raises(ValueError, match=r"extra.npy, line 1: .*<label 0 or 1>"):
    pathfinder.release_examples(str(root), "curv_contour_length_14")
  (metadata / "extra.npy").write_bytes(b"\x93NUMPY\x01\x00\xff\xfe")
  with pytest.raises(ValueError, match=r"extra.npy: not a text file"):
    pathfinder.release_examples(str(root), "curv_contour_length_14")
  (metadata / "extra.npy").write_text("imgs/1 sample_9.png 9 0 1.0 14 4 2 0.5 1 1\n")
  with pytest.raises(data.DatasetMissingError, match=r"1 image\(s\).*imgs/1/sample_9.png"):
    data.load(_config("pathfinder", dir=str(tmp_path)), seed=0)


def test_pathfinder_split_rounding_and_bad_images(tmp_path):
  root = tmp_path / "pathfinder32" / "curv_contour_length_14"
  _release(root, {"0.npy": ("imgs/0", [(n, 0) for n in range(13)])})
  # LRA's order: train 10 8 7 6 9 0 1 5 12 4 | validation 11 3 | test 2 (13 rows: TFDS
  # rounds 10.4 and 11.7 to the nearest, and drops empty images after slicing)
  (root / "imgs" / "0" / "sample_2.png").write_bytes(b"")
  _png(root / "imgs" / "0" / "sample_10.png", 16, 1)
  Image.new("RGB", (32, 32)).save(root / "imgs" / "0" / "sample_8.png")
  (root / "imgs" / "0" / "sample_7.png").write_bytes(b"not a png")
  task = data.load(_config("pathfinder", dir=str(tmp_path)), seed=0)
  assert {k: len(v) for k, v in task.splits.items()} == {"train": 10, "validation": 2, "test": 0}
  assert [int(task.splits["validation"][i]["inputs"][0]) - 1 for i in range(2)] == [11, 3]
  train = task.splits["train"]
  with pytest.raises(ValueError, match=r"sample_10.png: image is 16x16, expected 32x32"):
    train[0]
  with pytest.raises(ValueError, match=r"sample_8.png: image mode 'RGB'"):
    train[1]
  with pytest.raises(ValueError, match=r"sample_7.png: not a readable image"):
    train[2]
  assert int(train[3]["inputs"][0]) == 6 + 1  # sample_6 reads fine


def test_pathfinder_keys_the_source_does_not_read_are_errors(tmp_path):
  check = data.check_config
  with pytest.raises(ValueError, match=r"not the generator settings data.num_train=512, "
                     r"data.num_valid=512, data.num_test=512.*lra_pathx.py:dir="):
    check({**cli.load_config(f"{CONFIGS}/lra_pathfinder.py:tiny").data, "dir": str(tmp_path)})
  with pytest.raises(ValueError, match=r"data.num_distractors=6"):
    check({**cli.load_config(f"{CONFIGS}/lra_pathx.py").data, "dir": str(tmp_path)})
  for spec in ("lra_pathfinder.py:dir=/d", "lra_pathx.py:small,dir=/d", "lra_pathx.py:tiny"):
    check(cli.load_config(f"{CONFIGS}/{spec}").data)  # valid as written
  with pytest.raises(ValueError, match=r"data.difficulty='hard' is not a folder.*curv_baseline"):
    check(_config("pathfinder", dir="/d", difficulty="hard"))
  with pytest.raises(ValueError, match=r"data.resolution=48: the LRA release has "
                     r"pathfinder\{32,64,128,256\} only"):
    check(_config("pathfinder", dir="/d", resolution=48))
  with pytest.raises(ValueError, match=r"data.difficulty=.*read only with data.dir set"):
    check(_config("pathfinder", difficulty="curv_contour_length_9"))
  with pytest.raises(ValueError, match=r"data.resolution=64 has no published preset"):
    check(_config("pathfinder", resolution=64))
  with pytest.raises(TypeError, match=r"data.num_train='many' must be a int"):
    check(_config("pathfinder", num_train="many"))
  with pytest.raises(TypeError, match=r"data.thickness=True must be a float"):
    check(_config("pathfinder", thickness=True))


def _tsv(folder, name, rows):
  (folder / f"new_aan_pairs.{name}.tsv").write_bytes(b"".join(rows))


def test_retrieval_release_tsv(tmp_path):
  # label id1 id2 text1 text2, no header, float labels, quotes not special, raw bytes
  _tsv(tmp_path, "train", [b'1.0\tX96-1024\tP05-1077\tsay "hi"\t\xc3\xbc \xff\n',
                           b"0.0\tA00-1001\tA00-1002\tabcdefghij\tz\n"])
  _tsv(tmp_path, "eval", [b"0.0\ta\tb\tq\tr\n"])
  _tsv(tmp_path, "test", [b"1.0\ta\tb\t\"\t'\n", b"0.0\tc\td\tx\ty\n", b"1.0\te\tf\tu\tv\n"])
  task = data.load(_config("retrieval", dir=str(tmp_path), max_len=8), seed=0)
  assert task.dual and (task.vocab_size, task.num_classes, task.max_len) == (257, 2, 8)
  assert {k: len(v) for k, v in task.splits.items()} == {"train": 2, "validation": 1, "test": 3}
  first, second = task.splits["train"][0], task.splits["train"][1]
  assert first["inputs"].tolist() == [116, 98, 122, 33, 35, 105, 106, 35]  # 'say "hi"' + 1
  assert first["inputs2"].tolist() == [196, 189, 33, 256, 0, 0, 0, 0]  # c3 bc, ' ', ff
  assert second["inputs"].tolist() == [98, 99, 100, 101, 102, 103, 104, 105]  # cut at 8
  assert [int(task.splits["test"][i]["targets"]) for i in range(3)] == [1, 0, 1]
  assert first["targets"].dtype == np.int32 and int(first["targets"]) == 1
  assert task.splits["test"][0]["inputs"].tolist() == [35] + [0] * 7


def test_retrieval_malformed_rows_name_the_line(tmp_path):
  for name in ("train", "eval", "test"):
    _tsv(tmp_path, name, [b"1.0\ta\tb\tx\ty\n"])
  _tsv(tmp_path, "eval", [b"1.0\ta\tb\tx\ty\n", b"1.0\ta\tb\tx y\n"])
  with pytest.raises(ValueError, match=r"eval.tsv, line 2: 4 tab-separated columns"):
    data.load(_config("retrieval", dir=str(tmp_path)), seed=0)
  _tsv(tmp_path, "eval", [b"label\tid1\tid2\ttext1\ttext2\n"])
  with pytest.raises(ValueError, match=r"eval.tsv, line 1: label 'label' is not 0 or 1"):
    data.load(_config("retrieval", dir=str(tmp_path)), seed=0)
  _tsv(tmp_path, "eval", [b"2.0\ta\tb\tx\ty\n"])
  with pytest.raises(ValueError, match=r"label '2.0' is not 0 or 1"):
    data.load(_config("retrieval", dir=str(tmp_path)), seed=0)
  with pytest.raises(ValueError, match=r"data.max_len=0 must be a positive int"):
    data.check_config(_config("retrieval", dir=str(tmp_path), max_len=0))

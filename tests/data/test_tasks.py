"""Every task's batch contract, the pipeline's sharding and resume, and missing data."""

import logging

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from effx import data
from effx.data import pathfinder, pipeline


def _config(task, **overrides):
  return ml_collections.ConfigDict({**data.defaults(task), **overrides})


def _check_batch(task_data, batch_size=4, dual=False):
  batch = next(pipeline.train_iterator(pipeline.train_dataset(
      task_data.splits["train"], batch_size, seed=0)))
  keys = {"inputs", "targets"} | ({"inputs2"} if dual else set())
  assert set(batch) == keys
  for key in keys - {"targets"}:
    assert batch[key].shape == (batch_size, task_data.max_len) and batch[key].dtype == np.int32
    assert batch[key].min() >= 0 and batch[key].max() < task_data.vocab_size
  assert batch["targets"].shape == (batch_size,) and batch["targets"].dtype == np.int32
  assert batch["targets"].min() >= 0 and batch["targets"].max() < task_data.num_classes
  return batch


def test_listops_batches(tmp_path):
  task = data.load(_config("listops", min_length=8, max_length=40, num_train=20, num_valid=4,
                           num_test=4, cache_dir=str(tmp_path)), seed=0)
  batch = _check_batch(task)
  assert task.max_len == 39 and task.vocab_size == 16 and task.num_classes == 10
  assert (batch["inputs"][:, 0] >= 11).all()  # expressions start with an operator


@pytest.mark.parametrize("resolution", [32, 128])
def test_generated_pathfinder_batches(resolution, tmp_path):
  task = data.load(_config("pathfinder", resolution=resolution, num_train=8, num_valid=2,
                           num_test=2, cache_dir=str(tmp_path)), seed=0)
  batch = _check_batch(task)
  assert task.max_len == resolution**2 and task.num_classes == 2
  again = task.splits["train"][3]
  np.testing.assert_array_equal(again["inputs"], task.splits["train"][3]["inputs"])
  assert [int(task.splits["train"][i]["targets"]) for i in range(4)] == [0, 1, 0, 1]
  assert batch["inputs"].max() > 200  # markers and paths are drawn bright
  cached = sorted(p.name for p in tmp_path.iterdir())
  assert len(cached) == 3 and all(n.startswith(f"pathfinder{resolution}_") for n in cached)
  drawn = pathfinder.Generator(resolution, 14, num_distractors=2, **pathfinder.PRESETS[resolution])
  np.testing.assert_array_equal(task.splits["train"][5]["inputs"],
                                drawn(0, "train", 5).reshape(-1).astype(np.int32) + 1)


def test_pathfinder_release_files(tmp_path, caplog):
  from PIL import Image

  root = tmp_path / "pathfinder32" / "curv_contour_length_14"
  (root / "imgs" / "0").mkdir(parents=True)
  (root / "metadata").mkdir()
  lines = []
  for n in range(10):
    path = root / "imgs" / "0" / f"sample_{n}.png"
    if n == 4:
      path.write_bytes(b"")  # the release has one empty image
    else:
      Image.fromarray(np.full((32, 32), 10 * n, np.uint8)).save(path)
    lines.append(f"imgs/0 sample_{n}.png 0 {n % 2} 14 1.5 2")
  (root / "metadata" / "0.npy").write_text("\n".join(lines) + "\n")
  with caplog.at_level(logging.WARNING):
    task = data.load(_config("pathfinder", dir=str(tmp_path)), seed=0)
  assert "sample_4.png" in caplog.text
  sizes = {k: len(v) for k, v in task.splits.items()}
  assert sizes == {"train": 7, "validation": 1, "test": 1}
  example = task.splits["train"][1]  # LRA's order (see test_release_layout.py): sample_7
  assert example["inputs"].shape == (1024,) and int(example["inputs"][0]) == 70 + 1
  assert int(example["targets"]) == 1


def test_text_and_image_from_tfds_mock():
  with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
    text = data.load(_config("text", max_len=64), seed=0)
    _check_batch(text)
    assert text.vocab_size == 257 and text.num_classes == 2
    image = data.load(_config("image"), seed=0)
    batch = _check_batch(image)
    assert image.max_len == 1024 and image.num_classes == 10 and batch["inputs"].min() >= 1


def test_retrieval_tsv(tmp_path):
  for split in ("train", "eval", "test"):
    rows = [f"{n % 2}\tid{n}a\tid{n}b\tpaper {n} text\tcited {n} text ü" for n in range(6)]
    (tmp_path / f"new_aan_pairs.{split}.tsv").write_text("\n".join(rows) + "\n")
  task = data.load(_config("retrieval", dir=str(tmp_path), max_len=16), seed=0)
  assert task.dual
  batch = _check_batch(task, dual=True)
  example = task.splits["test"][1]
  assert bytes((example["inputs"][:7] - 1).astype(np.uint8)).decode() == "paper 1"
  assert int(example["targets"]) == 1 and example["inputs2"][15] == 0  # padded
  assert batch["inputs2"].shape == (4, 16)


def test_missing_datasets_fail_clearly(tmp_path):
  with pytest.raises(data.DatasetMissingError, match=r"(?s)IMDb.*download_and_prepare.*data.dir"):
    data.load(_config("text", dir=str(tmp_path)), seed=0)
  with pytest.raises(data.DatasetMissingError, match="lra_release"):
    data.load(_config("retrieval"), seed=0)
  with pytest.raises(data.DatasetMissingError, match="new_aan_pairs.train.tsv"):
    data.load(_config("retrieval", dir=str(tmp_path)), seed=0)
  with pytest.raises(data.DatasetMissingError, match="pathfinder32"):
    data.load(_config("pathfinder", dir=str(tmp_path)), seed=0)


def test_bad_data_config():
  with pytest.raises(ValueError, match="data.task='mnist'.*listops"):
    data.check_config({**data.defaults("listops"), "task": "mnist"})
  with pytest.raises(ValueError, match="unknown config key.*data.max_lenght"):
    data.check_config({**data.defaults("text"), "max_lenght": 3})
  with pytest.raises(TypeError, match="data.max_len='long'"):
    data.check_config({**data.defaults("text"), "max_len": "long"})


class _Range:
  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"inputs": np.full((2,), i, np.int32), "targets": np.int32(i)}


def test_hosts_read_disjoint_shards_of_the_same_global_batches():
  single = pipeline.train_dataset(_Range(40), 8, seed=5, process_index=0, process_count=1)
  hosts = [pipeline.train_dataset(_Range(40), 8, seed=5, process_index=p, process_count=2)
           for p in range(2)]
  for step in range(7):  # crosses an epoch boundary (5 batches per epoch)
    union = np.concatenate([h[step]["targets"] for h in hosts])
    assert sorted(union) == sorted(single[step]["targets"])
  epoch = np.concatenate([single[s]["targets"] for s in range(5)])
  assert sorted(epoch) == list(range(40))
  assert not np.array_equal(single[0]["targets"], single[5]["targets"])  # reshuffled


def test_iterator_state_resumes_exactly():
  ds = pipeline.train_dataset(_Range(40), 8, seed=1, process_index=0, process_count=1)
  it = pipeline.train_iterator(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it)["targets"] for _ in range(4)]
  resumed = pipeline.train_iterator(ds, state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["targets"], want)


def test_eval_batches_pad_with_zero_weights():
  batches = list(pipeline.eval_batches(_Range(10), 4, process_index=0, process_count=1))
  assert len(batches) == 3
  weights = np.concatenate([b["weights"] for b in batches])
  np.testing.assert_array_equal(weights, [1] * 10 + [0] * 2)
  np.testing.assert_array_equal(np.concatenate([b["targets"] for b in batches])[:10],
                                np.arange(10))
  with pytest.raises(ValueError, match="batch_size=5 is not divisible by the 2 processes"):
    pipeline.eval_batches(_Range(10), 5, process_index=0, process_count=2)


def test_describe_gives_loads_sizes_without_reading_data(tmp_path):
  config = {**data.defaults("listops"), "min_length": 8, "max_length": 40, "num_train": 50,
            "num_valid": 10, "num_test": 10, "cache_dir": str(tmp_path)}
  described = data.describe(config, seed=3)
  assert not described.splits and not list(tmp_path.iterdir())  # nothing generated
  loaded = data.load(ml_collections.ConfigDict(config), seed=3)
  assert (described.vocab_size, described.num_classes, described.max_len, described.dual) \
      == (loaded.vocab_size, loaded.num_classes, loaded.max_len, loaded.dual)
  retrieval = data.describe({**data.defaults("retrieval"), "max_len": 300}, seed=0)
  assert (retrieval.max_len, retrieval.dual) == (300, True)

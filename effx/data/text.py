"""LRA Text: IMDb sentiment (tfds ``imdb_reviews``), byte-level, binary.

The validation split is the last ``valid_fraction`` of IMDb's train split (LRA reported
its test set as "eval"; effx keeps test untouched for the best-on-validation checkpoint).
"""

from __future__ import annotations

import numpy as np

from effx.data.base import BYTE_VOCAB, MappedSource, TaskData, byte_tokens
from effx.data.tfds_source import data_source

DEFAULTS = dict(max_len=4000, valid_fraction=0.1)


def load(data, seed: int) -> TaskData:
  del seed  # the splits are fixed; shuffling happens in the pipeline
  cut = 100 - int(round(100 * data.valid_fraction))
  names = {"train": f"train[:{cut}%]", "validation": f"train[{cut}%:]", "test": "test"}

  def example(record):
    return {"inputs": byte_tokens(record["text"], data.max_len),
            "targets": np.int32(record["label"])}

  splits = {split: MappedSource(data_source("imdb_reviews", name, data.dir, "IMDb"), example)
            for split, name in names.items()}
  return TaskData(splits, vocab_size=BYTE_VOCAB, num_classes=2, max_len=data.max_len)

"""LRA Image: CIFAR-10 (tfds ``cifar10``) as 1024 grayscale pixel tokens, 10 classes.

Grayscale is ``round(0.2989 R + 0.5870 G + 0.1140 B)`` (the ITU-R 601 weights LRA's
``rgb_to_grayscale`` uses); pixel value ``p`` is token ``p + 1``. Validation is the last
``valid_fraction`` of CIFAR-10's train split.
"""

from __future__ import annotations

import numpy as np

from effx.data.base import BYTE_VOCAB, MappedSource, TaskData
from effx.data.tfds_source import data_source

DEFAULTS = dict(valid_fraction=0.1)
_GRAY = np.array([0.2989, 0.5870, 0.1140], np.float32)


def grayscale_tokens(image: np.ndarray) -> np.ndarray:
  """``[32, 32, 3]`` uint8 -> ``[1024]`` int32 tokens in ``1..256``."""
  gray = np.rint(np.asarray(image, np.float32) @ _GRAY).clip(0, 255)
  return gray.reshape(-1).astype(np.int32) + 1


def load(data, seed: int) -> TaskData:
  del seed
  cut = 100 - int(round(100 * data.valid_fraction))
  names = {"train": f"train[:{cut}%]", "validation": f"train[{cut}%:]", "test": "test"}

  def example(record):
    return {"inputs": grayscale_tokens(record["image"]), "targets": np.int32(record["label"])}

  splits = {split: MappedSource(data_source("cifar10", name, data.dir, "CIFAR-10"), example)
            for split, name in names.items()}
  return TaskData(splits, vocab_size=BYTE_VOCAB, num_classes=10, max_len=1024)

"""LRA Retrieval: AAN citation pairs from the LRA release, byte-level, 4000 per document.

``data.dir`` holds ``new_aan_pairs.{train,eval,test}.tsv`` (no header; columns
``label id1 id2 text1 text2``), from the LRA release archive
(``lra_release/lra_release/tsv_data/``). Examples carry ``inputs`` (document 1) and
``inputs2`` (document 2); the label says whether one cites the other.
"""

from __future__ import annotations

import csv
import os
import sys

import numpy as np

from effx.data.base import BYTE_VOCAB, DatasetMissingError, TaskData, byte_tokens

DEFAULTS = dict(max_len=4000)
FILES = {"train": "new_aan_pairs.train.tsv", "validation": "new_aan_pairs.eval.tsv",
         "test": "new_aan_pairs.test.tsv"}


class PairSource:
  def __init__(self, path: str, max_len: int):
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as f:
      rows = [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    bad = [i for i, row in enumerate(rows) if len(row) != 5]
    if bad:
      raise ValueError(f"{path}: line {bad[0] + 1} has {len(rows[bad[0]])} columns, "
                       "expected 5 (label id1 id2 text1 text2)")
    self._labels = np.array([int(float(row[0])) for row in rows], np.int32)
    self._texts = [(row[3], row[4]) for row in rows]
    self._max_len = max_len

  def __len__(self) -> int:
    return len(self._texts)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    text1, text2 = self._texts[index]
    return {"inputs": byte_tokens(text1, self._max_len),
            "inputs2": byte_tokens(text2, self._max_len), "targets": self._labels[index]}


def load(data, seed: int) -> TaskData:
  del seed
  if data.dir is None:
    raise DatasetMissingError(
        "Retrieval needs the LRA release's AAN files: download "
        "https://storage.googleapis.com/long-range-arena/lra_release.gz, unpack it and "
        "pass --config.data.dir=<lra_release>/lra_release/tsv_data")
  missing = [f for f in FILES.values() if not os.path.exists(os.path.join(data.dir, f))]
  if missing:
    raise DatasetMissingError(f"Retrieval: {', '.join(missing)} not found in data.dir="
                              f"{data.dir} (expected the LRA release's tsv_data folder)")
  splits = {split: PairSource(os.path.join(data.dir, name), data.max_len)
            for split, name in FILES.items()}
  return TaskData(splits, vocab_size=BYTE_VOCAB, num_classes=2, max_len=data.max_len, dual=True)

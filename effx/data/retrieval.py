"""LRA Retrieval: AAN citation pairs from the LRA release, byte-level, 4000 per document.

``data.dir`` holds ``new_aan_pairs.{train,eval,test}.tsv`` from the LRA release archive
(``lra_release/lra_release/tsv_data/``), read as LRA's ``matching/input_pipeline.py``
reads them: no header, tab-separated, no quoting, five columns ``label id1 id2 text1
text2`` with a float label (``1.0``) cast to an integer. Examples carry ``inputs``
(document 1) and ``inputs2`` (document 2), each its first ``data.max_len`` bytes as
tokens ``byte + 1`` padded with 0 (LRA's ``tokenizer="char"``: TFDS ``ByteTextEncoder``,
vocabulary 257), and ``targets``, whether one paper cites the other. Bytes are taken as
stored, like LRA's ``tf.string`` columns; only the first ``max_len`` of each document
are kept in memory.

Where effx deliberately differs: a label other than 0 or 1, or a line without five
columns, raises naming the file and line (LRA would cast or fail later); blank lines are
skipped; a ``max_len`` above 10,000 reads that many bytes (LRA cut documents at 10,000
bytes before ``max_length``); LRA's evaluation dropped the last partial batch, effx's
pipeline evaluates every example.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from effx.data.base import BYTE_VOCAB, DatasetMissingError, TaskData, byte_tokens

DEFAULTS = dict(max_len=4000)
FILES = {"train": "new_aan_pairs.train.tsv", "validation": "new_aan_pairs.eval.tsv",
         "test": "new_aan_pairs.test.tsv"}


def check(data: Mapping[str, Any]) -> None:
  """Every key is read; ``max_len`` must be positive.

  Args:
    data: every ``config.data`` key, defaults filled in.
  """
  max_len = data["max_len"]
  if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
    raise ValueError(f"data.max_len={max_len!r} must be a positive int")


class PairSource:
  """The document pairs of one TSV file (keeps each document's first ``max_len`` bytes)."""

  def __init__(self, path: str, max_len: int):
    labels, self._texts, self._max_len = [], [], max_len
    with open(path, "rb") as f:
      for number, line in enumerate(f, 1):
        line = line.rstrip(b"\n").removesuffix(b"\r")
        if not line:
          continue
        fields = line.split(b"\t")
        if len(fields) != 5:
          raise ValueError(f"{path}, line {number}: {len(fields)} tab-separated columns, "
                           "expected 5 (label id1 id2 text1 text2)")
        try:
          label = float(fields[0])
        except ValueError:
          label = None
        if label not in (0.0, 1.0):
          raise ValueError(f"{path}, line {number}: label {fields[0].decode(errors='replace')!r}"
                           " is not 0 or 1")
        labels.append(int(label))
        self._texts.append((fields[3][:max_len], fields[4][:max_len]))
    self._labels = np.array(labels, np.int32)

  def __len__(self) -> int:
    return len(self._texts)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    text1, text2 = self._texts[index]
    return {"inputs": byte_tokens(text1, self._max_len),
            "inputs2": byte_tokens(text2, self._max_len), "targets": self._labels[index]}


def load(data, seed: int) -> TaskData:
  """The three splits of ``data.dir`` (the release's ``tsv_data`` folder).

  Args:
    data: ``config.data`` of task ``retrieval``.
    seed: unused; the release fixes the splits.

  Returns:
    ``TaskData`` with ``dual=True`` and ``max_len = data.max_len`` per document.
  """
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

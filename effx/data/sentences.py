"""Unlabeled sentences, tokenized for a pretrained encoder (``data.task="sentences"``).

The task of distilling a pretrained encoder with a swapped attention family back toward
the original (``configs/pretrained_swap.py``): there are no labels, only text the
student and teacher both read.

* ``data.tokenizer``: the model folder whose ``tokenizer.json`` tokenizes the text
  (``effx.pretrained``; None: the installed all-MiniLM-L6-v2). Its ``config.json`` gives
  the vocabulary size.
* ``data.dir`` unset: the prose sentences of the built-in corpus (CPython's
  ``pydoc_data.topics``, the Python Language Reference pages ``effx.data.lm`` also
  reads). Paragraphs that are code or grammar (indented lines, ``>>>`` prompts, ``::=``
  rules) are dropped; the rest is split after ``.``, ``!`` or ``?`` before a capital or
  a quote, and sentences of ``min_words`` to 50 words ending in ``.!?:`` are kept:
  1,616 sentences in CPython 3.11.7 (the count follows the Python release). In corpus
  order, sentence ``i`` goes to validation when ``i % 10 == 8``, to test when
  ``i % 10 == 9``, else to train (80 / 10 / 10).
* ``data.dir`` set: ``train.txt``, ``validation.txt`` and ``test.txt`` there, one text
  per line (empty lines skipped).

Each example is ``{"inputs": int32 [max_len] ids ([CLS] ... [SEP], truncated, 0-padded),
"targets": 0}``. ``TaskData.kind`` is ``"embedding"`` and ``max_len`` is ``data.max_len``;
the model's own ``max_len`` (its position table) may be longer.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from effx.data.base import SPLITS, TaskData

DEFAULTS = dict(tokenizer=None, max_len=64, min_words=6)
MAX_WORDS = 50
_CODE_LINE = (" ", "\t", ">>>", "...")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(\u201c])")


def check(data) -> None:
  for key in ("max_len", "min_words"):
    value = data[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < (2 if key ==
                                                                          "max_len" else 1):
      raise ValueError(f"data.{key}={value!r} must be a positive integer"
                       + (" (>= 2: [CLS] and [SEP])" if key == "max_len" else ""))
  if data["dir"] and data["min_words"] != DEFAULTS["min_words"]:
    raise ValueError(f"data.min_words={data['min_words']} filters the built-in corpus; with "
                     "data.dir set every line of its files is read. Unset one of them")


def prose_sentences(document: str, min_words: int) -> list[str]:
  """The prose sentences of one ``pydoc_data`` page (module docstring)."""
  out = []
  for paragraph in re.split(r"\n\s*\n", document):
    lines = paragraph.split("\n")
    if any(line.startswith(_CODE_LINE) for line in lines) or "::=" in paragraph:
      continue
    text = " ".join(line.strip() for line in lines)
    for sentence in _SENTENCE_END.split(text):
      sentence = sentence.strip()
      words = sentence.split()
      if (min_words <= len(words) <= MAX_WORDS and sentence[-1] in ".!?:"
          and not sentence.startswith(("*", "-", "=", "+"))):
        out.append(sentence)
  return out


def builtin_splits(min_words: int = DEFAULTS["min_words"]) -> dict[str, list[str]]:
  """The built-in corpus' sentences per split."""
  from pydoc_data import topics  # noqa: PLC0415 (stdlib)

  sentences = [s for name in sorted(topics.topics)
               for s in prose_sentences(topics.topics[name], min_words)]
  which = {8: "validation", 9: "test"}
  splits = {name: [] for name in SPLITS}
  for i, sentence in enumerate(sentences):
    splits[which.get(i % 10, "train")].append(sentence)
  return splits


def read_splits(folder: str) -> dict[str, list[str]]:
  """``{split}.txt`` of ``folder``, one text per line."""
  splits = {}
  for name in SPLITS:
    path = os.path.join(folder, f"{name}.txt")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"data.dir={folder!r} has no {name}.txt (the sentences task "
                              "reads train.txt, validation.txt and test.txt, one text per "
                              "line)")
    with open(path, encoding="utf-8") as f:
      splits[name] = [line.strip() for line in f if line.strip()]
    if not splits[name]:
      raise ValueError(f"{path} has no text")
  return splits


class TokenSource:
  """Random-access examples of tokenized texts."""

  def __init__(self, texts: list[str], tokens: np.ndarray):
    self.texts, self.tokens = texts, tokens

  def __len__(self) -> int:
    return len(self.texts)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"inputs": self.tokens[index], "targets": np.int32(0)}


def _folder(data) -> str:
  from effx import pretrained  # noqa: PLC0415 (jax, flax and tokenizers: reading data needs none of them)

  if data["tokenizer"] is None:
    return pretrained.default_folder()
  return os.path.expanduser(data["tokenizer"])


def load(data, seed: int) -> TaskData:
  """The sentences of ``data`` tokenized by ``data.tokenizer``'s tokenizer."""
  from effx import pretrained  # noqa: PLC0415 (as in _folder)

  del seed  # the splits are fixed
  data = {"dir": None, **DEFAULTS, **dict(data)}
  check(data)
  folder = _folder(data)
  vocab_size = pretrained.model_settings(folder)["vocab_size"]
  tokenizer = pretrained.Tokenizer(folder, data["max_len"], vocab_size)
  texts = read_splits(data["dir"]) if data["dir"] else builtin_splits(data["min_words"])
  splits = {}
  for name, split in texts.items():
    splits[name] = TokenSource(split, tokenizer.padded(split, data["max_len"]))
  return TaskData(splits, vocab_size=vocab_size, num_classes=0, max_len=data["max_len"],
                  kind="embedding")


def describe(data) -> TaskData:
  """``load``'s sizes without tokenizing anything."""
  from effx import pretrained  # noqa: PLC0415 (as in _folder)

  data = {"dir": None, **DEFAULTS, **dict(data)}
  vocab_size = pretrained.model_settings(_folder(data))["vocab_size"]
  return TaskData({}, vocab_size, 0, data["max_len"], kind="embedding")

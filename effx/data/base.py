"""What every task module returns, and the helpers they share.

A task gives random-access sources (``len(source)``, ``source[i]``) of examples that
already have the batch contract's fixed shapes. Classification tasks: ``inputs`` int32
``[max_len]`` (padding id 0), ``targets`` int32 ``[]``, and ``inputs2`` for Retrieval.
Language-modelling tasks (``kind="lm"``): ``inputs`` and ``targets`` int32 ``[max_len]``
(``targets[i]`` is the token after ``inputs[i]``; 0 = no target there) and ``reset`` bool
``[]`` (the example starts a new document: segment memory is emptied before it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence

import numpy as np

SPLITS = ("train", "validation", "test")
BYTE_VOCAB = 257  # byte b is token b + 1; 0 is padding


class DatasetMissingError(FileNotFoundError):
  """A dataset that must be downloaded is not where the config points."""


class Source(Protocol):
  def __len__(self) -> int: ...
  def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


@dataclasses.dataclass(frozen=True)
class TaskData:
  """Sources per split and the sizes the model must match."""

  splits: dict[str, Source]
  vocab_size: int
  num_classes: int
  max_len: int
  dual: bool = False  # examples carry ``inputs2`` (Retrieval)
  # or "lm": per-token targets and ``reset`` (module doc); or "embedding": unlabeled
  # text for a sentence encoder (targets 0).
  kind: str = "classification"
  # Training reads the examples in order, unshuffled: example ``step * batch_size + row``
  # is the next segment of row ``row``'s stream (segment memory carries across steps).
  ordered: bool = False


def pad(tokens: Sequence[int] | np.ndarray, length: int) -> np.ndarray:
  """``tokens`` truncated or zero-padded to ``length``, int32."""
  out = np.zeros((length,), np.int32)
  tokens = np.asarray(tokens, np.int32)[:length]
  out[:len(tokens)] = tokens
  return out


def byte_tokens(text: Any, length: int) -> np.ndarray:
  """UTF-8 bytes of ``text`` (str or bytes) as tokens ``byte + 1``, padded to ``length``."""
  if isinstance(text, np.ndarray):
    text = text.item()
  if isinstance(text, str):
    text = text.encode("utf-8")
  return pad(np.frombuffer(text[:length], np.uint8).astype(np.int32) + 1, length)


def reject_generator_keys(data, keys, *, task: str, source: str, instead: str,
                          hint: str) -> None:
  """With ``data.dir`` set a task reads ``source``: any of its generator ``keys`` that is
  set (not None) would be ignored, so it is an error naming them, with ``hint``."""
  unread = [f"data.{k}={data[k]!r}" for k in keys if data[k] is not None]
  if data["dir"] and unread:
    raise ValueError(
        f"data.dir is set, so {task} reads {source} and not the generator settings "
        f"{', '.join(unread)}; unset them (--config.data.<key>=None), or unset data.dir "
        f"to {instead}. {hint}")


class MappedSource:
  """``fn(source[i])`` for every ``i``: a lazy, random-access map."""

  def __init__(self, source: Source, fn):
    self._source, self._fn = source, fn

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self._fn(self._source[index])

"""Batches from a task's random-access sources, with grain.

Training: the source is shuffled with the run's seed, reshuffled every epoch, and cut into
global batches of ``batch_size`` consecutive records; host ``p`` of ``P`` reads only
records ``p, p + P, p + 2P, ...`` of that stream, so the union of the hosts' local batches
is the same global batch whatever ``P`` is. The iterator's state (``{"next_index": k}``)
is saved with every checkpoint, so a resumed run sees exactly the batches it would have.

Evaluation: the split in order, padded to whole global batches with ``weights`` 0.

Language-modelling corpora (a source with ``streams(rows)``, ``effx.data.lm``) are read
as ``batch_size`` contiguous streams, in order and unshuffled, in training and in
evaluation: row ``r`` of every batch continues row ``r`` of the batch before.
"""

from __future__ import annotations

from typing import Iterator

import grain
import jax
import numpy as np

from effx.data.base import Source


def _local_size(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} is not divisible by the {process_count} "
                     "processes (hosts)")
  return batch_size // process_count


def train_dataset(source: Source, batch_size: int, seed: int, *, process_index: int | None = None,
                  process_count: int | None = None) -> grain.MapDataset:
  """Endless, seeded, host-sharded training batches (a grain ``MapDataset``)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  local = _local_size(batch_size, process_count)
  if hasattr(source, "streams"):
    # Not shuffled: global record step * batch_size + row is the next segment of row
    # ``row``; host p's local rows are p, p + P, ... of every global batch.
    ds = grain.MapDataset.source(source.streams(batch_size)).repeat(None)
    return ds[process_index::process_count].batch(local, drop_remainder=True)
  if len(source) < batch_size:
    raise ValueError(f"the training split has {len(source)} examples, fewer than "
                     f"batch_size={batch_size}")
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
  return ds[process_index::process_count].batch(local, drop_remainder=True)


def train_iterator(dataset: grain.MapDataset, state: dict | None = None, *,
                   threads: int = 2) -> grain.DatasetIterator:
  """An iterator over ``dataset`` (from ``train_dataset``), restored to ``state``."""
  options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
  iterator = iter(dataset.to_iter_dataset(options))
  if state is not None:
    iterator.set_state(state)
  return iterator


class _Padded:
  """``source`` followed by copies of its first record with weight 0."""

  def __init__(self, source: Source, size: int):
    self._source, self._size = source, size

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    real = index < len(self._source)
    example = dict(self._source[index if real else 0])
    example["weights"] = np.float32(real)
    return example


def eval_batches(source: Source, batch_size: int, *, max_examples: int | None = None,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Host-local batches covering ``source`` (or its first ``max_examples``) once, in
  order; each carries ``weights`` (1 real, 0 padding)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  local = _local_size(batch_size, process_count)
  if hasattr(source, "streams"):
    source = source.streams(batch_size)
    if max_examples is not None:  # whole steps of every stream
      max_examples = -(-max_examples // batch_size) * batch_size
  n = len(source) if max_examples is None else min(len(source), max_examples)
  if n == 0:
    raise ValueError("cannot evaluate on an empty split")
  total = -(-n // batch_size) * batch_size
  padded = _Padded(_Prefix(source, n), total)
  ds = grain.MapDataset.source(padded)[process_index::process_count].batch(local)
  options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
  return iter(ds.to_iter_dataset(options))


class _Prefix:
  def __init__(self, source: Source, n: int):
    self._source, self._n = source, n

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int):
    return self._source[index]

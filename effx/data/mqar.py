"""Multi-query associative recall (MQAR), generated on demand.

MQAR (Arora, Eyuboglu et al. 2023, "Zoology: Measuring and Improving Recall in Efficient
Language Models") tests whether a language model can look things up in its context: a
sequence first lists key-value pairs, then asks for several keys again, and the model
must predict each queried key's value. Attention solves it with one lookup per query;
fixed-state models (linear attention, SSMs, long convolutions) must squeeze all pairs
into their state, and Zoology shows this gap explains most of their perplexity gap.

Token layout (``n = num_pairs``, ``V = vocab_size``, ``L = length``):

* id 0 is padding and never occurs in ``inputs``; id 1 is the filler ("blank") token.
* keys are drawn from ``[2, 2 + (V - 2) // 2)``, values from ``[2 + (V - 2) // 2, V)``:
  two disjoint ranges, so a token is a key or a value by its id alone.
* context, positions ``0 .. 2n - 1``: ``k1 v1 k2 v2 ... kn vn``; the n keys are distinct
  and so are the n values (both drawn without replacement, as in Zoology).
* query region, positions ``2n .. L - 1``: filler, except that each of the n keys occurs
  once, in random order, at an even offset of the region (n of its ``(L - 2n) // 2``
  slots, chosen uniformly without replacement), followed by its value.
* ``targets[p]`` is the value of the key at ``p`` for each query position ``p`` in the
  query region, and 0 (not scored) everywhere else: exactly n scored positions.

Example i of a split depends only on ``(seed, split, i)`` (``np.random.default_rng([seed,
split index, i])``, split index 0 / 1 / 2 for train / validation / test), is drawn when
read and never stored, so sources are random-access, cost no disk, and splits never
share a random stream (identical examples across splits are possible but unlikely, as
in Zoology: nothing removes them).

Where effx differs from Zoology's generator (``zoology/data/multiquery_ar.py``):

* Query slots are uniform; Zoology draws them with a power law (``power_a=0.01``) that
  favours queries soon after the context.
* Each query is followed by its value in ``inputs``, so the sequence reads as language
  model text (a key, then its value, as in the context). Zoology leaves the next
  position blank, then (``random_non_queries``) fills every blank with a random id.
* Blanks are the fixed filler id 1, not random ids: every non-filler token in the query
  region is a query or an answer.
* Ids 0 and 1 are reserved, so keys start at 2 (Zoology's at 1, its 0 being the blank).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import numpy as np

from effx.data.base import SPLITS, TaskData

PAD = 0
FILLER = 1
FIRST_KEY = 2  # ids below are reserved

# Every config.data key besides task and dir. Small enough that a 2-layer, width-64
# model learns the task on a CPU in minutes.
DEFAULTS = {
    "num_pairs": 8,        # key-value pairs per sequence, all queried once
    "vocab_size": 256,     # all ids, the reserved 0 and 1 included
    "length": 64,          # sequence length: 2 * num_pairs context + the query region
    "num_train": 20_000,   # examples per split
    "num_valid": 500,
    "num_test": 1_000,
}


def check(data: Mapping[str, Any]) -> None:
  """Raises ``ValueError`` naming the key, for settings that admit no MQAR sequence.

  Args:
    data: every ``config.data`` key, defaults filled in.
  """
  if data["dir"] is not None:
    raise ValueError(f"data.dir={data['dir']!r}: MQAR is generated and reads no files; "
                     "unset data.dir (--config.data.dir=None)")
  for key in DEFAULTS:  # load may be called without effx.data's type check
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise ValueError(f"data.{key}={value!r} must be an int")
    if value <= 0:
      raise ValueError(f"data.{key}={value} must be positive")
  n, vocab_size, length = data["num_pairs"], data["vocab_size"], data["length"]
  if vocab_size < FIRST_KEY + 2 * n:
    raise ValueError(
        f"data.vocab_size={vocab_size} is too small for data.num_pairs={n}: ids 0 and 1 "
        f"are reserved and the rest is split into keys and values, each needing {n} "
        f"distinct ids; use data.vocab_size >= {FIRST_KEY + 2 * n}")
  if length < 4 * n:
    raise ValueError(
        f"data.length={length} is too short for data.num_pairs={n}: the context takes "
        f"{2 * n} tokens and the query region {2 * n} more (each query followed by its "
        f"value); use data.length >= {4 * n}")


def example(rng: np.random.Generator, num_pairs: int, vocab_size: int,
            length: int) -> dict[str, np.ndarray]:
  """One MQAR sequence (layout in the module docstring) drawn from ``rng``.

  Returns:
    ``inputs`` and ``targets`` int32 ``[length]``, ``reset`` bool ``[]`` (True).
  """
  n = num_pairs
  first_value = FIRST_KEY + (vocab_size - FIRST_KEY) // 2
  keys = rng.choice(np.arange(FIRST_KEY, first_value), size=n, replace=False)
  values = rng.choice(np.arange(first_value, vocab_size), size=n, replace=False)
  inputs = np.full((length,), FILLER, np.int32)
  targets = np.zeros((length,), np.int32)
  inputs[0:2 * n:2], inputs[1:2 * n:2] = keys, values
  # Random slots, random order: slot j of the query region starts at 2n + 2j.
  slots = rng.choice((length - 2 * n) // 2, size=n, replace=False)
  order = rng.permutation(n)
  queries = 2 * n + 2 * slots
  inputs[queries], inputs[queries + 1] = keys[order], values[order]
  targets[queries] = values[order]
  return {"inputs": inputs, "targets": targets, "reset": np.bool_(True)}


class _Source:
  """``num_examples`` sequences of one split, each drawn when read."""

  def __init__(self, num_examples: int, seed: int, split: str, settings: dict[str, int]):
    self._num_examples, self._settings = num_examples, settings
    self._stream = (seed, SPLITS.index(split))

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = operator.index(index)
    if not 0 <= index < self._num_examples:  # IndexError also ends plain iteration
      raise IndexError(f"example {index} of {self._num_examples}")
    return example(np.random.default_rng([*self._stream, index]), **self._settings)


def load(data, seed: int) -> TaskData:
  """The three MQAR splits, generated on demand.

  Args:
    data: ``config.data`` of task ``mqar``; a missing key takes its default.
    seed: with the split and the index, determines each example (a non-negative int).

  Returns:
    ``TaskData`` of kind ``"lm"``: ``vocab_size`` ids, ``max_len = length``, no classes.
  """
  data = {"dir": None, **DEFAULTS, **dict(data)}
  check(data)
  settings = {k: int(data[k]) for k in ("num_pairs", "vocab_size", "length")}
  sizes = {"train": data["num_train"], "validation": data["num_valid"],
           "test": data["num_test"]}
  return TaskData({split: _Source(int(size), seed, split, settings)
                   for split, size in sizes.items()},
                  vocab_size=settings["vocab_size"], num_classes=0,
                  max_len=settings["length"], kind="lm", ordered=False)

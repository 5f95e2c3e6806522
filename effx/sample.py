"""Generate text from a trained byte-level language model.

  python -m effx.sample --workdir=/tmp/lm_small --prompt="The for statement" \\
      --max_new_tokens=200 --temperature=0.8 --top_k=40 [--seed=0] [--checkpoint=best]

Prints the prompt and its continuation for each ``--prompt`` (repeat the flag for a
batch; prompts may differ in length). Decoding is incremental where the attention family
allows it (``effx.generate``); ``--recompute`` lets any other causal family decode by
running the model over the prefix for each token.
"""

from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
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


def sample_workdir(workdir: str, prompts: list[str], max_new_tokens: int, *,
                   temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
                   checkpoint: str = "best", recompute: bool = False) -> list[str]:
  """The continuation (text) of each prompt by ``workdir``'s model (``effx.generate``)."""
  import numpy as np  # noqa: PLC0415

  from effx import generate  # noqa: PLC0415
  from effx.data.base import BYTE_VOCAB  # noqa: PLC0415
  from effx.evaluate import restore  # noqa: PLC0415

  run, params, model_state, _ = restore(workdir, checkpoint)
  if run.model_config.kind != "causal_lm" or run.model_config.vocab_size != BYTE_VOCAB:
    raise ValueError(f"{workdir} holds a {run.model_config.kind} model with vocabulary "
                     f"{run.model_config.vocab_size}; effx.sample reads byte-level causal "
                     "LMs (data.task='lm'); call effx.generate.generate for token ids")
  if not prompts or any(not p for p in prompts):
    raise ValueError("--prompt must be a non-empty string")
  tokens = [np.frombuffer(p.encode("utf-8"), np.uint8).astype(np.int32) + 1 for p in prompts]
  model = run.model
  out = generate.generate(model, params, tokens, max_new_tokens, temperature=temperature,
                          top_k=top_k, seed=seed, recompute=recompute,
                          model_state=model_state)
  return [bytes((o - 1).astype(np.uint8)).decode("utf-8", errors="replace") for o in out]


def main(argv):
  del argv
  from effx import cli  # noqa: PLC0415

  cli.user_errors_in_one_line(_main)()


def _main():
  from effx import cli  # noqa: PLC0415

  cli.quiet_libraries()
  texts = sample_workdir(FLAGS.workdir, FLAGS.prompt, FLAGS.max_new_tokens,
                         temperature=FLAGS.temperature, top_k=FLAGS.top_k, seed=FLAGS.seed,
                         checkpoint=FLAGS.checkpoint, recompute=FLAGS.recompute)
  for prompt, text in zip(FLAGS.prompt, texts):
    sys.stdout.write(f"{prompt}{text}\n")
    if len(FLAGS.prompt) > 1:
      sys.stdout.write("-" * 40 + "\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)

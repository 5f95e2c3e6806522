"""effx: efficient transformers in JAX/Flax.

Where things are:
  attention/  the attention families behind one ``SelfAttention``, the block-sparse kernel
  layers/     residual, reversible and memory stacks, feed-forward, positions
  models/     classifier, dual encoder, sentence encoder, causal LM; decoding (generate)
  pretrained/ BERT-family Hugging Face folders loaded without torch; embedding files
  data/       one module per task, generators and the input pipeline
  compress/   distillation losses, pruning, quantization, structured pruning
  training/   the one training loop and what it stands on (config defaults and checks,
              run, objectives, checkpoints, metrics, sharding, restore, exports, AOT)
  launch/     sweeps: trials, local / Slurm / TPU launchers, reports
  bench/      benchmarks
  common/     logical axis names, local and bucket paths, the config-section rule
and the commands: ``python -m effx.train | evaluate | sweep | quantize | structured |
embed | sample | aot`` (each parses flags and calls a library function; ``effx.cli``).
"""

import importlib

__version__ = "0.1.0"

# Names that config files and user code import from ``effx`` itself, where they lived
# before the packages above: kept working, loaded on first use.
_MOVED = {"defaults": "effx.training.defaults", "generate": "effx.models.generate"}


def train_and_evaluate(config, workdir: str):
  """Trains and evaluates ``config`` (a training ConfigDict) in ``workdir``; see
  ``effx.training.loop.train_and_evaluate``. Imported on call, so that ``import
  effx.attention`` does not load the training stack."""
  from effx.training import loop  # noqa: PLC0415 (start-up time, as the docstring says)

  return loop.train_and_evaluate(config, workdir)


def __getattr__(name: str):
  if name in _MOVED:
    return importlib.import_module(_MOVED[name])
  raise AttributeError(f"module 'effx' has no attribute {name!r}")

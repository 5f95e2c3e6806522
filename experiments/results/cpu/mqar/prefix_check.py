"""Checks that a trained MQAR model's accuracy is causal: test accuracy from the full
forward against accuracy when every position's logits come from the tokens up to it
alone (``effx.models.generate.decode_logits(recompute=True)``), and with the answers that follow
earlier queries hidden (set to the filler id), on the first 128 test examples.

  python experiments/results/cpu/mqar/prefix_check.py WORKDIR [WORKDIR ...]
"""

import sys

import jax.numpy as jnp
import numpy as np

from effx.models import generate
from effx.data import mqar
from effx.training.restore import restore

NUM_EXAMPLES = 128


def accuracy(logits, targets) -> float:
  scored = targets != 0
  return float((np.asarray(jnp.argmax(logits, -1)) == targets)[scored].mean())


def main(workdirs: list[str]) -> None:
  for workdir in workdirs:
    run, params, _, _ = restore(workdir, "best")
    split = mqar.load(run.config.data, seed=run.config.seed).splits["test"]
    examples = [split[i] for i in range(NUM_EXAMPLES)]
    inputs = np.stack([e["inputs"] for e in examples])    # [batch, length]
    targets = np.stack([e["targets"] for e in examples])  # [batch, length]
    full, _ = run.model.apply({"params": params}, jnp.asarray(inputs))
    prefix = generate.decode_logits(run.model, params, jnp.asarray(inputs), recompute=True)
    hidden = inputs.copy()
    rows, cols = np.nonzero(targets)
    hidden[rows, cols + 1] = mqar.FILLER  # each query's answer, seen by later queries
    no_answers, _ = run.model.apply({"params": params}, jnp.asarray(hidden))
    print(f"{workdir}: full {accuracy(full, targets):.3f}, prefix-only "
          f"{accuracy(prefix, targets):.3f}, answers hidden {accuracy(no_answers, targets):.3f}")


if __name__ == "__main__":
  main(sys.argv[1:])

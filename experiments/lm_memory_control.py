"""Control for segment memory in training: a corpus where only memory can help.

Each document is a random 16-letter string repeated four times; with 16-byte segments,
a model without memory sees each repetition alone (random letters: log2(26) = 4.7 bits
per byte at best), while Transformer-XL memory of 16 states lets it copy the previous
segment. The built-in corpus is replaced by this one in-process; everything else is
``configs/lm_enwik8.py:tiny`` with the sizes below.

  python experiments/lm_memory_control.py --mem_len=16 --workdir=/tmp/copy_mem16
  python experiments/lm_memory_control.py --mem_len=0 --workdir=/tmp/copy_mem0
"""

import argparse
import os

import numpy as np

from effx import cli
from effx.training import loop as trainer
from effx.data import lm


def copy_documents(count: int = 400, period: int = 16, repeats: int = 4, seed: int = 0):
  rng = np.random.default_rng(seed)
  return [bytes(rng.integers(97, 123, period, dtype=np.uint8)) * repeats + b"!"
          for _ in range(count)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mem_len", type=int, required=True)
  parser.add_argument("--workdir", required=True)
  args = parser.parse_args()
  lm.builtin_documents = copy_documents  # the corpus this control trains on
  here = os.path.dirname(os.path.abspath(__file__))
  c = cli.load_config(os.path.join(here, "..", "configs", "lm_enwik8.py") + ":tiny")
  c.data.seq_len = 16
  c.model.update(mem_len=args.mem_len, num_layers=2, emb_dim=64, qkv_dim=64, num_heads=2,
                 mlp_dim=128, dropout_rate=0.0, attention_dropout_rate=0.0)
  c.update(num_train_steps=400, eval_every_steps=200, checkpoint_every_steps=400,
           learning_rate=3e-3, max_eval_examples=0, max_test_examples=0, batch_size=8)
  results = trainer.train_and_evaluate(c, args.workdir)
  print(f"mem_len={args.mem_len}: validation {results['eval_bpb']:.3f} bpb, "
        f"test {results['test_bpb']:.3f} bpb")


if __name__ == "__main__":
  main()

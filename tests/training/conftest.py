import pathlib

import pytest

from effx import cli

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def tiny_config(name: str, **overrides):
  """``configs/<name>.py:tiny`` with quick, deterministic settings for tests."""
  config = cli.load_config(f"{CONFIGS / name}.py:tiny")
  config.update(dict(learning_rate=3e-3, warmup_steps=2, schedule="constant",
                     weight_decay=0.0, num_train_steps=30, eval_every_steps=15,
                     checkpoint_every_steps=10, log_every_steps=5, max_eval_examples=16))
  config.model.update(dropout_rate=0.0, attention_dropout_rate=0.0)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture
def retrieval_dir(tmp_path):
  for split in ("train", "eval", "test"):
    rows = [f"{n % 2}\ta{n}\tb{n}\t{'xy' * (n + 1)} paper\t{'q' * n} other" for n in range(16)]
    (tmp_path / f"new_aan_pairs.{split}.tsv").write_text("\n".join(rows) + "\n")
  return str(tmp_path)

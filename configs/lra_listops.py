"""LRA ListOps: 10-way classification of nested MIN/MAX/MED/SM expressions.

Settings of the LRA repository's ``listops/configs/transformer_base.py`` (4 layers,
emb 512, MLP 1024; the paper's appendix says 6 layers / MLP 2048), data from effx's
generator with LRA's settings (lengths 500..2000, depth 10, 10 arguments), or from LRA's
release files with ``data.dir``; ``data.tokenizer=lra`` drops every ``]`` as LRA's
published results did (see ``effx/data/listops.py``).

  python -m effx.train --config=configs/lra_listops.py --workdir=/tmp/listops
  python -m effx.train --config=configs/lra_listops.py:small --workdir=/tmp/listops_small
  python -m effx.train --config=configs/lra_listops.py --workdir=/tmp/listops_lra \\
      --config.data.dir=<lra_release>/lra_release/listops-1000 --config.data.tokenizer=lra
"""

from effx.training import defaults


def get_config(size=None):
  c = defaults.base("listops")
  c.batch_size = 32
  c.num_train_steps = 5000
  c.learning_rate = 0.05
  c.warmup_steps = 1000
  c.schedule = "rsqrt"
  c.weight_decay = 0.1
  c.model.update(num_layers=4, emb_dim=512, qkv_dim=512, num_heads=8, mlp_dim=1024,
                 pool="cls")
  c = defaults.resize(c, size)
  if size == "small":   # shorter expressions: learnable in minutes on a CPU
    c.data.update(min_length=16, max_length=128, num_train=20_000, num_valid=1000,
                  num_test=1000)
    c.num_train_steps = 1000
    c.learning_rate = 0.005
    c.weight_decay = 0.01
  elif size == "tiny":
    c.data.update(min_length=8, max_length=64, num_train=500, num_valid=64, num_test=64)
    c.learning_rate = 0.005
  return c


def sweep_families(add, arg=None):
  """Every attention family at its defaults (``python -m effx.sweep --sweep=families``);
  the families' own options (window, features, landmarks) are effx's defaults, which
  follow the papers."""
  del arg
  from effx.attention import registry  # noqa: PLC0415

  for family in registry.names():
    add(**{"model.attention": family})


def sweep_lr(add, arg=None):
  """Peak learning rate x warm-up steps for the dense Transformer (``--sweep=lr``)."""
  from effx import sweep  # noqa: PLC0415

  rates = (0.001, 0.005, 0.01) if arg in ("small", "tiny") else (0.01, 0.05, 0.1)
  for overrides in sweep.product(learning_rate=rates, warmup_steps=(100, 1000)):
    add(**overrides)


def search_lr(trial, arg=None):
  """Peak learning rate, warm-up and weight decay of the dense Transformer, searched
  (``python -m effx.sweep --search=lr --trials=20``)."""
  small = arg in ("small", "tiny")
  return {
      "learning_rate": trial.suggest_float("learning_rate", 3e-4 if small else 3e-3,
                                           3e-2 if small else 3e-1, log=True),
      "warmup_steps": trial.suggest_categorical("warmup_steps", [100, 300, 1000]),
      "weight_decay": trial.suggest_float("weight_decay", 1e-3, 0.3, log=True),
  }

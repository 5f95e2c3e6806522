"""Multi-query associative recall (MQAR; Arora et al., 2023): which attention families
can look up a key's value in their context (``effx/data/mqar.py``).

A 2-layer causal LM of width 64 as in Zoology's small-scale probes; accuracy is over the
queried positions only (chance: 1 / 127 values). ``--sweep=families_pairs`` runs every
causal family at 4, 8, 16 and 32 pairs in sequences of 128 tokens.

  python -m effx.train --config=configs/mqar.py --workdir=/tmp/mqar
  python -m effx.train --config=configs/mqar.py --workdir=/tmp/mqar_linear \\
      --config.model.attention=linear --config.data.num_pairs=16
  python -m effx.sweep --config=configs/mqar.py --sweep=families_pairs --root=/tmp/mqar_sweep
"""

from effx import defaults


def get_config(size=None):
  c = defaults.base("mqar")
  c.data.update(num_pairs=8, vocab_size=256, length=128, num_train=20_000, num_valid=500,
                num_test=1000)
  c.batch_size = 64
  c.num_train_steps = 1500
  c.learning_rate = 2e-3
  c.warmup_steps = 100
  c.schedule = "cosine"
  c.weight_decay = 0.1
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.log_every_steps = 100
  c.model.update(num_layers=2, emb_dim=64, qkv_dim=64, num_heads=2, mlp_dim=128,
                 dropout_rate=0.0, attention_dropout_rate=0.0, positional="learned")
  if size == "tiny":
    c = defaults.resize(c, "tiny")
    c.data.update(length=32, num_pairs=4, num_train=512, num_valid=64, num_test=64)
  elif size not in (None, "full"):
    raise ValueError(f"configs/mqar.py has sizes full (default) and tiny, not {size!r}")
  return c


def sweep_families_pairs(add, arg=None):
  """Every causal attention family at its defaults x 4, 8, 16, 32 key-value pairs."""
  del arg
  from effx.attention import registry  # noqa: PLC0415

  for family in registry.names():
    if registry.supports_causal(family):
      for pairs in (4, 8, 16, 32):
        add(**{"model.attention": family, "data.num_pairs": pairs})

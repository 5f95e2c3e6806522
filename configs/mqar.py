"""Multi-query associative recall (MQAR; Arora et al., 2023): which attention families
can look up a key's value in their context (``effx/data/mqar.py``).

A 2-layer causal LM of width 64 as in Zoology's small-scale probes, sized to train on one
CPU core in about a minute: sequences of 64 tokens over a 64-id vocabulary (31 keys,
31 values), batch 32. Accuracy is over the queried positions only (chance: 1 / 31
values; answering with any value of the context not yet asked, i.e. no recall at all:
(1 + 1/2 + ... + 1/pairs) / pairs, 75% at 2 pairs, 52% at 4, 34% at 8).
``--sweep=families_pairs`` runs twelve causal families at 2, 4, 8 and 16 pairs (about an
hour and a quarter on one core); results in ``experiments/results/cpu/mqar/`` (and, for
hierarchical and adaptive_span, ``experiments/results/cpu/new_families/``).

  python -m effx.train --config=configs/mqar.py --workdir=/tmp/mqar
  python -m effx.train --config=configs/mqar.py --workdir=/tmp/mqar_linear \\
      --config.model.attention=linear --config.data.num_pairs=16
  python -m effx.sweep --config=configs/mqar.py --sweep=families_pairs \\
      --workdir=/tmp/mqar_sweep --parallel=1
"""

from effx.training import defaults

# Sequence length of the default config and of the sweep (the query region needs
# 2 * num_pairs tokens after the 2 * num_pairs of the context: pairs <= LENGTH / 4).
LENGTH = 64
PAIRS = (2, 4, 8, 16)
# The causal families the sweep runs (48 trials in about 75 minutes on one CPU core;
# routing, sinkhorn and synthesizer, also causal, are left out to fit that).
FAMILIES = ("dense", "blockwise", "local", "longformer", "sparse", "dilated", "lsh",
            "linear", "performer", "cosformer", "hierarchical", "adaptive_span")
# Options of the families whose defaults would make them dense at LENGTH = 64: each
# reaches 16 positions back
# instead (sparse: stride 8, about sqrt(LENGTH)). Every other family runs at its
# defaults; cosformer's re-weighting horizon is the sequence length, as a causal LM needs.
FAMILY_OPTIONS = {
    "local": {"window": 16},                # default 128 >= LENGTH: dense
    "longformer": {"window": 16},           # default 128 >= LENGTH: dense (+ global token 0)
    "dilated": {"window": 8},               # default 64 covers all of LENGTH; dilation
                                            # its default: half the heads 1, the rest 2
    "sparse": {"stride": 8},                # default 128: the band alone is dense; ~sqrt(64)
    "lsh": {"bucket_size": 16},             # default 64: one chunk, every token sees all
    "cosformer": {"max_len": LENGTH},       # default: each example's extent (not causal)
    "adaptive_span": {"max_span": LENGTH},  # learns how far back to look, up to all of it
}


def get_config(size=None):
  c = defaults.base("mqar")
  c.data.update(num_pairs=8, vocab_size=64, length=LENGTH, num_train=100_000,
                num_valid=500, num_test=1000)
  c.batch_size = 32
  c.num_train_steps = 1000        # dense at 8 pairs: ~32%, and no better after 4000 steps
  c.learning_rate = 1e-2
  c.warmup_steps = 100
  c.schedule = "cosine"
  c.weight_decay = 0.1
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.log_every_steps = 250
  c.model.update(num_layers=2, emb_dim=64, qkv_dim=64, num_heads=4, mlp_dim=128,
                 dropout_rate=0.0, attention_dropout_rate=0.0, positional="learned")
  if size == "tiny":
    c = defaults.resize(c, "tiny")
    c.data.update(length=32, num_pairs=4, num_train=512, num_valid=64, num_test=64)
  elif size not in (None, "full"):
    raise ValueError(f"configs/mqar.py has sizes full (default) and tiny, not {size!r}")
  return c


def sweep_families_pairs(add, arg=None):
  """``FAMILIES`` x ``PAIRS`` key-value pairs, each family at its defaults but for
  ``FAMILY_OPTIONS``."""
  del arg
  for pairs in PAIRS:  # pairs outermost: a partial sweep still has whole columns
    for family in FAMILIES:
      overrides = {"model.attention": family, "data.num_pairs": pairs}
      if family in FAMILY_OPTIONS:
        overrides["model.attention_kwargs"] = FAMILY_OPTIONS[family]
      add(**overrides)

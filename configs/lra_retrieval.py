"""LRA Retrieval: do two AAN papers cite each other? Bytes, 4000 per document.

LRA repository ``matching/configs/transformer_base.py``: 4 layers, emb 128, 4 heads,
MLP 512, batch 32, 5000 steps, lr 0.05 with 8000 warm-up steps, rsqrt. The head combines
the two document vectors as ``[u, v, u*v, u-v]`` (the paper; LRA's code concatenated).
The AAN TSV files come from the LRA release (see ``effx.data.retrieval``).

  python -m effx.train --config=configs/lra_retrieval.py --workdir=/tmp/retrieval \\
      --config.data.dir=<lra_release>/lra_release/tsv_data
"""

from effx.training import defaults


def get_config(size=None):
  c = defaults.base("retrieval")
  c.batch_size = 32
  c.num_train_steps = 5000
  c.learning_rate = 0.05
  c.warmup_steps = 8000
  c.schedule = "rsqrt"
  c.weight_decay = 0.1
  c.model.update(num_layers=4, emb_dim=128, qkv_dim=128, num_heads=4, mlp_dim=512, pool="cls")
  c.data.max_len = 4000
  c = defaults.resize(c, size)
  if size in ("small", "tiny"):
    c.data.max_len = 1000 if size == "small" else 256
    c.learning_rate = 0.005
  return c

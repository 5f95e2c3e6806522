"""LRA Text: IMDb sentiment from bytes (tfds ``imdb_reviews``, prepared once offline).

LRA repository ``text_classification/configs/transformer_base.py``: 4 layers, emb 256,
4 heads, MLP 1024, batch 32, 20k steps, lr 0.05 with 8000 warm-up steps and rsqrt decay;
length 4000 as in the paper (the repository's config used 1000).

  python -m effx.train --config=configs/lra_text.py --workdir=/tmp/text \\
      --config.data.dir=~/tensorflow_datasets
"""

from effx.training import defaults


def get_config(size=None):
  c = defaults.base("text")
  c.batch_size = 32
  c.num_train_steps = 20_000
  c.learning_rate = 0.05
  c.warmup_steps = 8000
  c.schedule = "rsqrt"
  c.weight_decay = 0.1
  c.model.update(num_layers=4, emb_dim=256, qkv_dim=256, num_heads=4, mlp_dim=1024, pool="cls")
  c.data.max_len = 4000
  c = defaults.resize(c, size)
  if size in ("small", "tiny"):
    c.data.max_len = 1000
    c.learning_rate = 0.005
  return c

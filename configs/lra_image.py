"""LRA Image: CIFAR-10 as 1024 grayscale pixel tokens (tfds ``cifar10``).

LRA repository ``image/configs/cifar10/transformer_base.py``: 1 layer, emb 128, qkv 64,
8 heads, MLP 128, batch 256, 35k steps, lr 5e-4 with 175 warm-up steps and cosine decay,
no weight decay, dropout 0.3, attention dropout 0.2.

  python -m effx.train --config=configs/lra_image.py --workdir=/tmp/image
"""

from effx.training import defaults


def get_config(size=None):
  c = defaults.base("image")
  c.batch_size = 256
  c.num_train_steps = 35_000
  c.learning_rate = 5e-4
  c.warmup_steps = 175
  c.schedule = "cosine"
  c.weight_decay = 0.0
  c.model.update(num_layers=1, emb_dim=128, qkv_dim=64, num_heads=8, mlp_dim=128,
                 dropout_rate=0.3, attention_dropout_rate=0.2, pool="cls")
  c = defaults.resize(c, size)
  if size in ("small", "tiny"):
    c.learning_rate = 1e-3
  return c

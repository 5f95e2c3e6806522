"""LRA Pathfinder (32x32): are the two dots joined by a dashed path? 1024 pixel tokens.

LRA repository ``pathfinder/configs/transformer_base.py``: 4 layers, emb 32, qkv 16,
4 heads, MLP 32, batch 512, 62,400 steps, lr 1e-3 with 312 warm-up steps and cosine
decay, no weight decay, dropout 0.2, mean pooling. Images come from effx's generator,
or with ``dir=<lra_release>`` in the argument from the LRA release (the
``curv_contour_length_14`` folder and LRA's splits; see ``effx.data.pathfinder``).
The argument is comma-separated: a size (``small``, ``tiny``) and/or
``dir=<folder>``, last. The sizes shrink the generated splits; with ``dir`` the
release's splits are used whole.

  python -m effx.train --config=configs/lra_pathfinder.py --workdir=/tmp/pathfinder
  python -m effx.train --config=configs/lra_pathfinder.py:dir=/data/lra_release \\
      --workdir=/tmp/pathfinder_release
"""

from effx.training import defaults


def get_config(arg=None):
  size, _, folder = (arg or "").partition("dir=")
  size = size.rstrip(",") or None
  c = defaults.base("pathfinder")
  c.batch_size = 512
  c.num_train_steps = 62_400
  c.learning_rate = 1e-3
  c.warmup_steps = 312
  c.schedule = "cosine"
  c.weight_decay = 0.0
  c.model.update(num_layers=4, emb_dim=32, qkv_dim=16, num_heads=4, mlp_dim=32,
                 dropout_rate=0.2, attention_dropout_rate=0.1, pool="mean")
  c.data.resolution = 32
  c = defaults.resize(c, size)
  if folder:  # the release: the generator's settings must stay unset
    c.data.dir = folder
  elif size in ("small", "tiny"):
    c.data.update(num_train=20_000 if size == "small" else 512, num_valid=512, num_test=512)
  return c

"""LRA Path-X: Pathfinder at 128x128 (16,384 pixel tokens).

LRA repository ``pathfinder/configs/transformer_base.py`` at 128 px: 1 layer, emb 32,
qkv 16, 2 heads, MLP 32, batch 64, 500k steps, lr 1e-3 with 2500 warm-up steps, cosine,
gradient clipping 1.0, mean pooling. Dense attention at this length needs ~1 GiB per
head and example for the score matrix: pick an efficient family. Images come from
effx's generator (6 distractor contours), or with ``dir=<lra_release>`` in the argument
from the LRA release's ``pathfinder128/curv_contour_length_14`` with LRA's splits. The
argument is comma-separated: a size (``small``, ``tiny``) and/or ``dir=<folder>``,
last. The sizes shrink the generated splits; with ``dir`` the release's are used whole.

  python -m effx.train --config=configs/lra_pathx.py --workdir=/tmp/pathx \\
      --config.model.attention=performer
  python -m effx.train --config=configs/lra_pathx.py:dir=/data/lra_release \\
      --workdir=/tmp/pathx_release --config.model.attention=performer
"""

from effx.training import defaults


def get_config(arg=None):
  size, _, folder = (arg or "").partition("dir=")
  size = size.rstrip(",") or None
  c = defaults.base("pathfinder")
  c.batch_size = 64
  c.num_train_steps = 500_000
  c.learning_rate = 1e-3
  c.warmup_steps = 2500
  c.schedule = "cosine"
  c.weight_decay = 0.0
  c.grad_clip_norm = 1.0
  c.model.update(num_layers=1, emb_dim=32, qkv_dim=16, num_heads=2, mlp_dim=32,
                 dropout_rate=0.2, attention_dropout_rate=0.1, pool="mean")
  c.data.resolution = 128
  c = defaults.resize(c, size)
  if folder:  # the release: the generator's settings must stay unset
    c.data.dir = folder
  else:
    c.data.num_distractors = 6
    if size in ("small", "tiny"):
      c.data.update(num_train=10_000 if size == "small" else 256, num_valid=256, num_test=256)
  if size in ("small", "tiny"):
    c.model.attention = "local"
    c.model.attention_kwargs = {"window": 128}
  if size == "tiny":  # 16K tokens an example: fewer, smaller steps keep it about a minute
    c.update(batch_size=4, num_train_steps=20, eval_every_steps=10, checkpoint_every_steps=10,
             max_eval_examples=32, max_test_examples=32)
  return c

"""Byte-level language modelling: enwik8 (or text8), or the built-in corpus offline.

Full size: a 12-layer Transformer-XL-sized model (width 512, 8 heads, MLP 2048) on
segments of 512 bytes with 512 remembered (``model.mem_len``), batch 22, Adam with a
cosine schedule from 2.5e-4, as Dai et al. (2019) trained their enwik8 base model
(their relative positions are rotary ones here). It reads enwik8 from ``data.dir``
(``enwik8`` or ``enwik8.zip``; the standard 90M / 5M / 5M split). ``:small`` (a few
minutes on a 2-core CPU) and ``:tiny`` (a smoke test) read the built-in corpus
(``effx/data/lm.py``) unless ``data.corpus`` says otherwise. Results are bits per byte.

  python -m effx.train --config=configs/lm_enwik8.py:small --workdir=/tmp/lm_small
  python -m effx.train --config=configs/lm_enwik8.py:small --workdir=/tmp/lm_small_nomem \\
      --config.model.mem_len=0
  python -m effx.train --config=configs/lm_enwik8.py --workdir=/tmp/enwik8 \\
      --config.data.dir=<folder with enwik8.zip>
  python -m effx.train --config=configs/lm_enwik8.py --workdir=/tmp/text8 \\
      --config.data.corpus=text8 --config.data.dir=<folder with text8.zip>
  python -m effx.sample --workdir=/tmp/lm_small --prompt="The for statement"
"""

from effx.training import defaults


def get_config(size=None):
  c = defaults.base("lm")
  c.data.update(corpus="enwik8", seq_len=512)
  c.batch_size = 22
  c.num_train_steps = 400_000
  c.learning_rate = 2.5e-4
  c.warmup_steps = 0
  c.schedule = "cosine"
  c.weight_decay = 0.0
  c.adam_b2 = 0.999
  c.grad_clip_norm = 0.25
  c.eval_every_steps = 4000
  c.checkpoint_every_steps = 4000
  c.max_eval_examples = 22 * 200  # 200 segments of each of the 22 streams
  c.model.update(num_layers=12, emb_dim=512, qkv_dim=512, num_heads=8, mlp_dim=2048,
                 dropout_rate=0.1, attention_dropout_rate=0.0, positional="rotary",
                 mem_len=512)
  c = defaults.resize(c, size)
  if size in ("small", "tiny"):
    c.data.update(corpus="builtin")
    c.learning_rate = 2e-3
    c.warmup_steps = 100 if size == "small" else 5
    c.weight_decay = 0.01
  if size == "small":
    c.data.seq_len = 128
    c.model.update(num_layers=2, emb_dim=128, qkv_dim=128, num_heads=4, mlp_dim=512,
                   mem_len=128, dropout_rate=0.0)
    c.batch_size = 16
    c.num_train_steps = 1500
    c.eval_every_steps = 250
    c.checkpoint_every_steps = 250
    c.max_eval_examples = 0  # the whole validation split (about 23 KB)
    c.max_test_examples = 0
  elif size == "tiny":
    c.data.seq_len = 32
    c.model.update(mem_len=32)
    c.batch_size = 8
  return c


def sweep_memory(add, arg=None):
  """With and without segment memory at equal segment length (``--sweep=memory``)."""
  del arg
  for mem_len in (0, 128):
    add(**{"model.mem_len": mem_len})

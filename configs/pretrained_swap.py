"""Swap a pretrained encoder's attention and distil it back toward the original.

The student is the pretrained model (``effx.pretrained``; default: all-MiniLM-L6-v2,
installed by README's set-up command) with ``model.attention`` replaced, initialised
from the checkpoint (``distill.init_from_teacher``); the teacher is the same checkpoint
with its own dense attention. Both read unlabeled sentences (``data.task="sentences"``:
the built-in corpus' prose, or ``data.dir``'s text files), tokenized by the model's
tokenizer, at most 64 tokens. Losses (``effx.compress.distill``): attention-output transfer on
every layer (T2R / LoLCATs' first stage), hidden states (MSE), MiniLM's value relation,
and ``1 - cos`` of the sentence embeddings; validation and the best checkpoint use the
embeddings' mean cosine similarity to the teacher's.

  python -m effx.train --config=configs/pretrained_swap.py \\
      --config.model.attention=local --config.model.attention_kwargs='{"window": 8}' \\
      --workdir=/tmp/minilm_local

``configs/pretrained_swap.py:<folder>`` loads another BERT-family folder.
``--sweep=families`` runs every family with the options of ``FAMILY_OPTIONS``
(``python -m effx.sweep --config=configs/pretrained_swap.py --sweep=families
--workdir=/tmp/swap_sweep``); ``experiments/pretrained_swap.py`` makes the results table.
"""

from effx.training import defaults
from effx import pretrained

# Budgets about a quarter of a typical sentence (20 to 40 tokens), so that no family
# covers every pair of a sentence (blockwise is exact: the control).
FAMILY_OPTIONS = {
    "dense": {},
    "blockwise": {"q_chunk": 16, "k_chunk": 16},
    "local": {"window": 8},
    "dilated": {"window": 4, "dilation": 2},
    "sparse": {"stride": 8},
    "longformer": {"window": 8},
    "bigbird": {"block_size": 4, "num_random_blocks": 1, "num_global_blocks": 1},
    "lsh": {"bucket_size": 8},
    "routing": {"window": 8, "num_clusters": 4},
    "sinkhorn": {"block_size": 8, "max_len": 64},
    "linformer": {"k": 16, "max_len": 64},
    "synthesizer": {"mode": "dense", "max_len": 64},
    "nystrom": {"num_landmarks": 8},
    "linear": {},
    "performer": {"num_features": 64},
    "cosformer": {"max_len": 64},
}
EXACT = ("dense", "blockwise")
MAX_LEN = 64


def get_config(folder=None):
  folder = folder or pretrained.default_folder()
  c = defaults.base("sentences")
  c.model.update(pretrained.model_settings(folder))
  c.data.update(tokenizer=folder, max_len=MAX_LEN)
  c.distill.update(teacher_model=folder, init_from_teacher=True, kd_weight=0.0,
                   ce_weight=0.0, embedding_weight=1.0, attention_weight=1.0,
                   hidden_weight=1.0, value_relation_weight=1.0)
  # Fine-tuning from the checkpoint: a small peak rate, a short warm-up, no weight decay
  # (it would pull the weights away from the teacher's).
  # 100 steps (2.5 passes over the 1,294 training sentences) take about 4 minutes on a
  # 2-core CPU.
  c.update(batch_size=32, num_train_steps=100, learning_rate=1e-4, warmup_steps=10,
           schedule="cosine", weight_decay=0.0, grad_clip_norm=1.0, eval_every_steps=50,
           checkpoint_every_steps=50, log_every_steps=25, keep_checkpoints=1)
  return c


def sweep_families(add, arg=None):
  """Every family of ``FAMILY_OPTIONS`` but the exact ones (dense is the teacher itself
  and blockwise computes it exactly: there is nothing to distil)."""
  del arg
  for family, options in FAMILY_OPTIONS.items():
    if family not in EXACT:
      add(**{"model.attention": family, "model.attention_kwargs": options})

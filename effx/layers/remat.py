"""Rematerialisation policies by name, for ``nn.remat`` around each layer.

Blocks tag activations with ``jax.ad_checkpoint.checkpoint_name``: ``"attn_out"`` (the
attention sub-block's output) and ``"mlp_out"`` (the feed-forward sub-block's output).

* ``"none"``: no remat; every intermediate is saved (fastest, most memory).
* ``"full"``: save only each layer's input; recompute the whole layer in backward.
* ``"dots"``: save matrix-multiply outputs without batch dimensions (projections and
  MLP matmuls); recompute elementwise work and attention scores.
* ``"attention"``: save the named attention outputs; recompute the feed-forward and
  everything inside attention that the backward needs.
"""

from __future__ import annotations

import jax

POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attention": jax.checkpoint_policies.save_only_these_names("attn_out"),
}
NAMES = ("none", *POLICIES)


def policy(name: str):
  """The ``jax.checkpoint`` policy for ``name`` (``"none"`` has none: no remat)."""
  if name not in NAMES:
    raise ValueError(f"remat={name!r} is not one of {', '.join(map(repr, NAMES))}")
  return POLICIES.get(name)

"""Logical axis names of every parameter and activation in effx.

Modules annotate tensors with these names (``nn.with_logical_partitioning`` on
parameters, ``nn.with_logical_constraint`` on activations); the training config maps
them to mesh axes with rules such as ``(("batch", "data"), ("heads", "model"))``.
"""

BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
HEADS = "heads"
KV = "kv"          # per-head feature dimension
MLP = "mlp"
VOCAB = "vocab"
LAYERS = "layers"  # leading axis of parameters stacked over a scanned stack of layers


def path_name(path) -> str:
  """``"encoder/encoder/layers/block/mlp_block/feed_forward/mlp/wi/kernel"``: a pytree key
  path (dict keys, attribute names, sequence indices) as one string."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def stacked_over_layers(path) -> bool:
  """Whether the parameter at ``path`` is stacked over a scanned stack's layers (its
  leading axis is ``LAYERS``)."""
  return any(getattr(k, "key", None) == LAYERS for k in path)

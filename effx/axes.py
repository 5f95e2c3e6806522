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

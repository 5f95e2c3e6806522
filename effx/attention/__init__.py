"""The attention zoo.

Every family mixes already-projected heads with one call signature,
``family(q, k, v, *, mask=None, deterministic=True)`` on ``[batch, length, heads, head_dim]``
tensors, and registers under a name::

    import effx.attention as ea
    ea.names()                                   # ('dense', 'blockwise', 'local', ...)
    mixer = ea.make("local", causal=True, window=64)
    layer = ea.SelfAttention(num_heads=8, qkv_features=512, attention="performer",
                             attention_kwargs={"num_features": 128})

``reference`` is the dense float32 oracle the tests compare every family against.
``kernel`` is the block-sparse kernel the pattern families share: describe which key
blocks each query block visits (``kernel.Layout``) and call ``kernel.attend``.
"""

from effx.attention.registry import (backends, get, make, names, options, register,
                                     supports_causal)
from effx.attention.reference import reference

# Importing the family modules registers them, in this order.
from effx.attention.dense import DenseAttention, dense_attention
from effx.attention.blockwise import BlockwiseAttention, blockwise_attention
from effx.attention.local import LocalAttention, local_attention
from effx.attention.dilated import DilatedAttention, dilated_attention
from effx.attention.sparse import SparseAttention, sparse_attention
from effx.attention.longformer import LongformerAttention, longformer_attention
from effx.attention.bigbird import BigBirdAttention, bigbird_attention
from effx.attention.lsh import LSHAttention, lsh_attention
from effx.attention.routing import RoutingAttention, routing_attention
from effx.attention.sinkhorn import SinkhornAttention
from effx.attention.linformer import LinformerAttention
from effx.attention.synthesizer import SynthesizerAttention
from effx.attention.nystrom import NystromAttention, nystrom_attention
from effx.attention.performer import PerformerAttention, performer_attention
from effx.attention.linear import LinearAttention, linear_attention
from effx.attention.cosformer import CosformerAttention, cosformer_attention
from effx.attention.hierarchical import HierarchicalAttention, hierarchical_attention
from effx.attention.adaptive_span import AdaptiveSpanAttention, adaptive_span_attention

from effx.attention import kernel
from effx.attention.patterns import pattern, pattern_names, plot_pattern
from effx.attention.self_attention import SelfAttention

__all__ = [
    "kernel", "names", "get", "make", "options", "backends", "register", "supports_causal",
    "reference",
    "pattern", "pattern_names", "plot_pattern", "SelfAttention",
    "DenseAttention", "BlockwiseAttention", "LocalAttention", "DilatedAttention",
    "SparseAttention", "LongformerAttention", "BigBirdAttention", "LSHAttention",
    "RoutingAttention", "SinkhornAttention", "LinformerAttention", "SynthesizerAttention",
    "NystromAttention", "PerformerAttention", "LinearAttention", "CosformerAttention",
    "HierarchicalAttention", "AdaptiveSpanAttention",
    "dense_attention", "blockwise_attention", "local_attention", "dilated_attention",
    "sparse_attention", "longformer_attention", "bigbird_attention", "lsh_attention",
    "routing_attention", "nystrom_attention", "performer_attention", "linear_attention",
    "cosformer_attention", "hierarchical_attention", "adaptive_span_attention",
]

"""Transformer building blocks: feed-forward (chunked), positional encodings, pre-norm
sub-blocks, plain / rematerialised / reversible stacks, and segment memory."""

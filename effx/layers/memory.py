"""Segment memory for causal language models: Transformer-XL recurrence (Dai et al., 2019)
and the Compressive Transformer (Rae et al., 2020).

Each layer keeps the inputs it saw for the last ``mem_len`` positions (stop-gradient).
For a new segment it attends causally over ``[compressed memory; memory; segment]``:
the attention family runs on that concatenation with ``causal=True`` and the segment's
outputs are kept, so any causal-capable family works (sparse ones apply their pattern
over the concatenated positions). With ``compressed_len > 0``, states pushed out of the
memory are compressed by ``compression_rate`` (mean-pool, max-pool, or a learned strided
1-D convolution) into a second FIFO of ``compressed_len`` slots. The compression is
trained only by the auxiliary attention-reconstruction loss: content-based attention of
the segment's (normalised, stop-gradient) states over the evicted memories versus over
their compression (Rae et al., Sec. 3.2; computed without the layer's projections).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effx.common import axes
from effx.layers import remat
from effx.layers.config import BlockConfig
from effx.layers.sublayers import AttentionSublayer, FeedForwardSublayer, layer_norm

COMPRESSIONS = ("mean", "max", "conv")


def empty_memory(batch: int, num_layers: int, width: int, mem_len: int,
                 compressed_len: int = 0, dtype=jnp.float32) -> dict[str, jax.Array]:
  """Memory before the first segment: every slot invalid, next position 0.

  Keys: ``hidden [layers, batch, mem_len, width]`` with ``valid``/``positions``
  ``[batch, mem_len]``; ``compressed [layers, batch, compressed_len, width]`` with
  ``compressed_valid``/``compressed_positions`` (only with ``compressed_len > 0``: an
  empty array cannot be checkpointed); ``next_position [batch]``.
  """
  def slots(n):
    return (jnp.zeros((num_layers, batch, n, width), dtype), jnp.zeros((batch, n), bool),
            jnp.zeros((batch, n), jnp.int32))
  hidden, valid, positions = slots(mem_len)
  memory = {"hidden": hidden, "valid": valid, "positions": positions,
            "next_position": jnp.zeros((batch,), jnp.int32)}
  if compressed_len:
    compressed, c_valid, c_positions = slots(compressed_len)
    memory.update(compressed=compressed, compressed_valid=c_valid,
                  compressed_positions=c_positions)
  return memory


def reset_memory(memory: dict[str, jax.Array], reset: jax.Array) -> dict[str, jax.Array]:
  """``memory`` with the rows where ``reset [batch]`` is True emptied (as
  ``empty_memory``'s: every slot invalid, next position 0); a new document starts there."""
  def clear(name, x):
    axis = 1 if name in ("hidden", "compressed") else 0  # [layers, batch, ...]
    r = reset.reshape((1,) * axis + (-1,) + (1,) * (x.ndim - axis - 1))
    return jnp.where(r, jnp.zeros((), x.dtype), x)
  return {name: clear(name, x) for name, x in memory.items()}


def memory_axes(name: str) -> tuple[str | None, ...]:
  """Logical axes of memory entry ``name`` (for sharding its batch over ``data``)."""
  if name in ("hidden", "compressed"):
    return (axes.LAYERS, axes.BATCH, axes.LENGTH, axes.EMBED)
  return (axes.BATCH,) if name == "next_position" else (axes.BATCH, axes.LENGTH)


def _pool(x, rate, how):
  """``[b, n, ...]`` -> ``[b, n // rate, ...]`` by mean, max or any (bool)."""
  x = x.reshape(x.shape[0], -1, rate, *x.shape[2:])
  return {"mean": jnp.mean, "max": jnp.max, "any": jnp.any, "last": lambda a, axis: a[:, :, -1]
          }[how](x, axis=2)


def _content_attention(q, m, m_valid):
  """softmax(q m^T / sqrt(d)) m over valid memory slots; [b, s, d] x [b, n, d]."""
  logits = jnp.einsum("bsd,bnd->bsn", q, m) * q.shape[-1] ** -0.5
  logits = jnp.where(m_valid[:, None, :], logits, -1e30)
  weights = jax.nn.softmax(logits, axis=-1) * jnp.any(m_valid, -1)[:, None, None]
  return jnp.einsum("bsn,bnd->bsd", weights, m)


class MemoryBlock(nn.Module):
  """One causal block with segment memory (the body of ``MemoryStack``'s scan).

  ``__call__(x, (mem, cmem, cache), mask, positions, mem_valid, mem_positions, c_valid,
  c_positions)`` returns ``(y, (new_mem, new_cmem, y, attention_output, aux_loss,
  new_cache))``; ``cache`` is None, or this layer's decoding state (then ``x`` is one
  token and the memory is empty).
  """

  config: BlockConfig
  mem_len: int
  compressed_len: int = 0
  compression_rate: int = 1
  compression: str = "mean"
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, xs, mask, positions, mem_valid, mem_positions, c_valid, c_positions):
    mem, cmem, cache = xs
    cfg = self.config
    seg = x.shape[1]
    if cache is not None:
      attn, cache = AttentionSublayer(cfg, x.shape[-1], name="attention_block")(
          x, mask, self.deterministic, positions, cache=cache)
    else:
      context = jnp.concatenate([cmem, mem, x], axis=1).astype(x.dtype)
      full_mask = jnp.concatenate([c_valid, mem_valid, mask], axis=1)
      full_pos = jnp.concatenate([c_positions, mem_positions, positions], axis=1)
      attn = AttentionSublayer(cfg, x.shape[-1], name="attention_block")(
          context, full_mask, self.deterministic, full_pos)[:, -seg:]
    y = x + attn
    y = y + FeedForwardSublayer(cfg, x.shape[-1], name="mlp_block")(y, self.deterministic)
    # Memory update: append this layer's inputs, keep the newest mem_len.
    stream = jnp.concatenate([mem, jax.lax.stop_gradient(x)], axis=1)
    new_mem = stream[:, -self.mem_len:] if self.mem_len else stream[:, :0]
    aux_loss = jnp.zeros((), jnp.float32)
    new_cmem = cmem
    if self.compressed_len:
      evicted = stream[:, :seg]                                # oldest states leave memory
      ev_valid = jnp.concatenate([mem_valid, mask], axis=1)[:, :seg]
      squeezed = self._compress(evicted)
      new_cmem = jnp.concatenate([cmem, jax.lax.stop_gradient(squeezed)], axis=1)
      new_cmem = new_cmem[:, -self.compressed_len:]
      q = jax.lax.stop_gradient(layer_norm(cfg, "reconstruction_norm")(x))
      target = _content_attention(q, evicted, ev_valid)
      got = _content_attention(q, squeezed, _pool(ev_valid, self.compression_rate, "any"))
      aux_loss = jnp.mean(jnp.square(target - got))
    return y, (new_mem, new_cmem, y, attn, aux_loss, cache)

  def _compress(self, states):
    if self.compression == "conv":
      return nn.Conv(states.shape[-1], (self.compression_rate,),
                     strides=(self.compression_rate,), padding="VALID", name="compress",
                     kernel_init=nn.with_logical_partitioning(
                         nn.initializers.lecun_normal(), (None, None, axes.EMBED)),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                            (axes.EMBED,)))(states)
    return _pool(states, self.compression_rate, self.compression)


class MemoryStack(nn.Module):
  """``num_layers`` causal blocks with segment memory, scanned over layers.

  ``__call__(x, mask, positions, memory, deterministic, cache=None)`` returns
  ``(y, new_memory, aux)`` with ``aux = {"hidden", "attention", "compression_loss"}``,
  and ``aux["cache"]`` when decoding with ``cache`` (per-layer states stacked on a leading
  layer axis; ``x`` one token).
  """

  config: BlockConfig
  num_layers: int
  mem_len: int
  compressed_len: int = 0
  compression_rate: int = 2
  compression: str = "mean"

  def __post_init__(self):
    check_memory(self.config, self.mem_len, self.compressed_len, self.compression_rate,
                 self.compression)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, mask, positions, memory: dict[str, Any], deterministic: bool,
               cache: dict[str, Any] | None = None):
    cfg = self.config
    seg = x.shape[1]
    if self.compressed_len and seg % self.compression_rate:
      raise ValueError(f"segment length {seg} must be a multiple of "
                       f"model.compression_rate={self.compression_rate}")
    block = MemoryBlock
    if cfg.remat != "none":
      block = nn.remat(MemoryBlock, policy=remat.policy(cfg.remat), prevent_cse=False)
    scanned = nn.scan(
        block, variable_axes={"params": 0, "state": 0, "losses": 0, "metrics": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0,) + (nn.broadcast,) * 6, length=self.num_layers,
        metadata_params={nn.PARTITION_NAME: axes.LAYERS})
    layers = scanned(cfg, self.mem_len, self.compressed_len, self.compression_rate,
                     self.compression, deterministic, name="layers")
    hidden = memory["hidden"]
    if self.compressed_len:
      cmem, c_valid, c_pos = (memory["compressed"], memory["compressed_valid"],
                              memory["compressed_positions"])
    else:
      cmem = jnp.zeros((*hidden.shape[:2], 0, hidden.shape[-1]), hidden.dtype)
      c_valid, c_pos = jnp.zeros((x.shape[0], 0), bool), jnp.zeros((x.shape[0], 0), jnp.int32)
    y, (new_hidden, new_comp, hidden, attention, losses, cache) = layers(
        x, (hidden, cmem, cache), mask, positions, memory["valid"], memory["positions"],
        c_valid, c_pos)
    new_memory = _advance(memory, mask, positions, seg, self.mem_len, self.compressed_len,
                          self.compression_rate, new_hidden, new_comp)
    y = layer_norm(cfg, "final_norm")(y)
    aux = {"hidden": hidden, "attention": attention, "compression_loss": jnp.sum(losses)}
    if cache is not None:
      aux["cache"] = cache
    return y, new_memory, aux


def _advance(memory, mask, positions, seg, mem_len, compressed_len, rate, hidden, compressed):
  """The shared (per-position) bookkeeping of a memory after one segment."""
  valid = jnp.concatenate([memory["valid"], mask], axis=1)
  pos = jnp.concatenate([memory["positions"], positions], axis=1)
  new = dict(memory)
  new["hidden"] = hidden
  new["valid"] = valid[:, valid.shape[1] - mem_len:] if mem_len else valid[:, :0]
  new["positions"] = pos[:, pos.shape[1] - mem_len:] if mem_len else pos[:, :0]
  if compressed_len:
    c_valid = jnp.concatenate([memory["compressed_valid"], _pool(valid[:, :seg], rate, "any")], 1)
    c_pos = jnp.concatenate([memory["compressed_positions"], _pool(pos[:, :seg], rate, "last")], 1)
    new["compressed"] = compressed
    new["compressed_valid"] = c_valid[:, -compressed_len:]
    new["compressed_positions"] = c_pos[:, -compressed_len:]
  new["next_position"] = memory["next_position"] + seg
  return new


def check_memory(config: BlockConfig, mem_len: int, compressed_len: int, rate: int,
                 compression: str) -> None:
  """Raises ``ValueError`` naming the first inconsistent memory option."""
  if not config.causal:
    raise ValueError("segment memory needs causal attention (model.kind='causal_lm')")
  for name, value in (("mem_len", mem_len), ("compressed_len", compressed_len)):
    if not isinstance(value, int) or value < 0:
      raise ValueError(f"model.{name}={value!r} must be a non-negative integer")
  if not isinstance(rate, int) or rate <= 0:
    raise ValueError(f"model.compression_rate={rate!r} must be a positive integer")
  if compression not in COMPRESSIONS:
    raise ValueError(f"model.compression={compression!r} is not one of "
                     f"{', '.join(map(repr, COMPRESSIONS))}")
  if compressed_len and not mem_len:
    raise ValueError("model.compressed_len > 0 needs model.mem_len > 0 (memories are "
                     "compressed when they leave the memory)")

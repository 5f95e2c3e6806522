"""Incremental decoding of a causal LM: ``generate`` and teacher-forced ``decode_logits``.

Every row consumes one token per step of one jit-compiled ``lax.scan``: its prompt while
it lasts, then what it samples, so a batch may mix prompt lengths (no padding, no
parallel prefill: a prompt costs one step per token). How a step sees the past depends
on the model (``decode_mode``):

* ``"cache"``: the attention family's decoding state (``effx.attention.decoding``): a key
  cache for ``dense`` / ``blockwise`` / ``sparse`` / ``longformer`` (grows with the
  context), a ring buffer of the window for ``local`` / ``dilated``, running sums for
  ``linear`` / ``performer`` / ``cosformer`` (constant per token).
* ``"memory"``: models trained with segment memory (Transformer-XL) decode one-token
  segments through that memory: each token sees the last ``mem_len`` ones.
* ``"recompute"``: any other causal family (``lsh``, ``routing``, ``sinkhorn``,
  ``synthesizer``), only when asked for (``recompute=True``):
  each step runs the whole model over the sequence so far (the rest padded) and reads
  the newest position, O(length) work per token. Families whose causal output at a
  position ignores later (padded) positions give the forward's logits exactly;
  content-routed ones (``lsh``, ``routing``) sort padding into their buckets too, so
  their logits can differ slightly from a forward over the prefix alone.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effx.attention import registry

MODES = ("cache", "memory", "recompute")


def decode_mode(model: nn.Module, recompute: bool = False) -> str:
  """How ``model`` (a ``CausalLM``) decodes (module docstring); raises with the options
  when it cannot."""
  cfg = model.config
  if cfg.kind != "causal_lm":
    raise ValueError(f"decoding needs model.kind='causal_lm', not {cfg.kind!r}")
  if cfg.mem_len or cfg.compressed_len:
    if cfg.compressed_len and cfg.compression_rate > 1:
      raise ValueError("a Compressive Transformer (model.compressed_len > 0) compresses "
                       f"segments by compression_rate={cfg.compression_rate}; one-token "
                       "decoding is not supported for it")
    return "memory"
  if registry.get(cfg.attention).decodable and not cfg.reversible:
    return "cache"
  if recompute:
    return "recompute"
  decodable = [n for n in registry.names() if registry.get(n).decodable]
  why = "a reversible stack" if cfg.reversible else f"attention family {cfg.attention!r}"
  raise ValueError(f"{why} cannot decode token by token (families that can: "
                   f"{', '.join(decodable)}); pass recompute=True (--recompute) to run the "
                   "whole model over the prefix for every new token")


def _check_capacity(model, mode: str, capacity: int) -> None:
  cfg = model.config
  if mode != "memory" and cfg.positional == "learned" and capacity > cfg.max_len:
    raise ValueError(f"prompt + new tokens = {capacity} tokens exceed model.max_len="
                     f"{cfg.max_len}, the learned position table's length (a model without "
                     "segment memory sees at most max_len tokens); shorten the prompt or "
                     "max_new_tokens")


def _stepper(model, variables, mode: str, batch: int, capacity: int):
  """``(state, step)`` with ``step(state, tokens [b], t) -> (logits [b, vocab], state)``."""
  if mode == "cache":
    def step(state, tokens, t):
      del t
      logits, aux = model.apply(variables, tokens[:, None], cache=state)
      return logits[:, 0], aux["cache"]
    return model.init_cache(batch, capacity), step
  if mode == "memory":
    def step(state, tokens, t):
      del t
      logits, aux = model.apply(variables, tokens[:, None], memory=state)
      return logits[:, 0], aux["memory"]
    return model.initial_memory(batch), step

  def step(state, tokens, t):
    state = state.at[:, t].set(tokens)
    logits, _ = model.apply(variables, state)
    return jnp.take(logits, t, axis=1), state
  return jnp.zeros((batch, capacity), jnp.int32), step


_COMPILED: dict = {}


def _scan(model, variables, buffer, lengths, key, **static):
  """``_scan_impl`` jit-compiled once per model config and static settings (a module with
  a dict option cannot be a static argument of ``jax.jit`` itself)."""
  signature = (repr(model.config), tuple(sorted(static.items())))
  if signature not in _COMPILED:
    if len(_COMPILED) >= 8:  # each capacity compiles anew: keep only the recent ones
      del _COMPILED[next(iter(_COMPILED))]
    _COMPILED[signature] = jax.jit(functools.partial(_scan_impl, model, **static))
  return _COMPILED[signature](variables, buffer, lengths, key)


def _scan_impl(model, variables, buffer, lengths, key, *, mode, capacity, teacher,
               temperature, top_k):
  batch = buffer.shape[0]
  state, step = _stepper(model, variables, mode, batch, capacity)

  def body(carry, t):
    state, buffer = carry
    logits, state = step(state, buffer[:, t], t)
    if teacher:
      return (state, buffer), logits
    nxt = sample(logits, jax.random.fold_in(key, t), temperature, top_k)
    keep = t + 1 < lengths  # still inside the prompt
    buffer = buffer.at[:, t + 1].set(jnp.where(keep, buffer[:, t + 1], nxt))
    return (state, buffer), None

  steps = capacity if teacher else capacity - 1
  (_, buffer), logits = jax.lax.scan(body, (state, buffer), jnp.arange(steps))
  return buffer, (None if logits is None else jnp.moveaxis(logits, 0, 1))


def sample(logits: jax.Array, key: jax.Array, temperature: float = 1.0,
           top_k: int | None = None) -> jax.Array:
  """Next tokens ``[batch]`` from ``logits [batch, vocab]``: the argmax at temperature 0,
  else a draw from ``softmax(logits / temperature)`` over the ``top_k`` likeliest ids
  (None: all). Id 0 (padding) is never drawn."""
  logits = logits.astype(jnp.float32).at[:, 0].set(-jnp.inf)
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits / temperature).astype(jnp.int32)


def _check_prompts(prompts, vocab: int) -> list[np.ndarray]:
  if isinstance(prompts, np.ndarray) and prompts.ndim == 1:
    prompts = [prompts]
  out = [np.asarray(p, np.int64) for p in prompts]
  if not out:
    raise ValueError("no prompts given")
  for i, p in enumerate(out):
    if p.ndim != 1 or len(p) == 0:
      raise ValueError(f"prompt {i} is empty or not a sequence of token ids")
    if p.min() < 1 or p.max() >= vocab:
      raise ValueError(f"prompt {i} has ids outside 1..{vocab - 1} (0 is padding): "
                       f"{p.min()}..{p.max()}")
  return out


def generate(model: nn.Module, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             *, temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
             recompute: bool = False, model_state: dict | None = None) -> list[np.ndarray]:
  """Continues each prompt by ``max_new_tokens`` tokens.

  Args:
    model: a ``CausalLM`` (``effx.models.build``); params: its parameters.
    prompts: one sequence of token ids (1..vocab-1) per row; lengths may differ.
    max_new_tokens: tokens to add to every prompt (>= 1).
    temperature: 0 is greedy; otherwise the softmax temperature (> 0).
    top_k: sample among the ``top_k`` likeliest ids (None: all; else >= 1).
    seed: the draws follow ``PRNGKey(seed)`` (same seed, same tokens).
    recompute: allow families without a decoding state (module docstring).
    model_state: the model's other collections (routing's centroids), if any.

  Returns:
    One int32 array of ``max_new_tokens`` ids per prompt.
  """
  cfg = model.config
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
  if top_k is not None and (not isinstance(top_k, int) or not 1 <= top_k < cfg.vocab_size):
    raise ValueError(f"top_k={top_k!r} must be an integer in 1..{cfg.vocab_size - 1} "
                     "(or None: no cut)")
  if not temperature >= 0:
    raise ValueError(f"temperature={temperature!r} must be >= 0 (0: greedy)")
  prompts = _check_prompts(prompts, cfg.vocab_size)
  mode = decode_mode(model, recompute)
  lengths = np.array([len(p) for p in prompts])
  capacity = int(lengths.max()) + max_new_tokens
  _check_capacity(model, mode, capacity)
  buffer = np.zeros((len(prompts), capacity), np.int32)
  for i, p in enumerate(prompts):
    buffer[i, :len(p)] = p
  out, _ = _scan(model, _variables(params, model_state), jnp.asarray(buffer),
                 jnp.asarray(lengths, jnp.int32), jax.random.PRNGKey(seed), mode=mode,
                 capacity=capacity, teacher=False, temperature=float(temperature),
                 top_k=top_k)
  out = np.asarray(out)
  return [out[i, n:n + max_new_tokens] for i, n in enumerate(lengths)]


def _variables(params, model_state):
  state = {k: v for k, v in (model_state or {}).items() if k != "memory"}  # training's
  return {"params": params, **state}


def decode_logits(model: nn.Module, params, tokens: jax.Array, *, recompute: bool = False,
                  model_state: dict | None = None) -> jax.Array:
  """Teacher forcing through the decoding path: ``tokens [batch, length]`` (0-padded at
  the end) fed one step at a time; returns the logits after each, ``[batch, length,
  vocab]``, which equal the model's forward on ``tokens`` up to float rounding."""
  mode = decode_mode(model, recompute)
  capacity = tokens.shape[1]
  _check_capacity(model, mode, capacity)
  lengths = jnp.full((tokens.shape[0],), capacity, jnp.int32)
  _, logits = _scan(model, _variables(params, model_state), jnp.asarray(tokens, jnp.int32), lengths,
                    jax.random.PRNGKey(0), mode=mode, capacity=capacity, teacher=True,
                    temperature=1.0, top_k=None)
  return logits

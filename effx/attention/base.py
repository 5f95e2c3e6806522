"""What every attention family shares: the base module and input/option checks."""

from __future__ import annotations

from typing import Any, ClassVar, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp

from effx.attention import registry


class Family(nn.Module):
  """Base class of attention families.

  A family mixes already-projected heads: ``__call__(q, k, v, *, mask=None,
  deterministic=True)`` with ``q, k, v`` of shape ``[batch, length, heads, head_dim]``
  and ``mask`` a ``[batch, length]`` boolean padding mask (True = real token). It returns
  ``[batch, length, heads, head_dim_v]`` in ``q``'s dtype, with zeros at padded query
  positions. Subclasses check their options in ``check_options`` so that bad values fail
  when the module is built, not deep inside a traced computation.
  """

  causal: bool = False
  # The backend of the family's attention (see ``backends``): "auto" picks the fastest
  # one the device and the input allow.
  implementation: str = "auto"

  supports_causal: ClassVar[bool] = True
  family_name: ClassVar[str] = "?"
  # How the family exposes its allow-pattern: "static" families have
  # ``allow_matrix(length, num_heads=1) -> [num_heads, length, length]``; "content" families
  # have ``allow_matrix(q, k, *, mask=None) -> [batch, heads, length, length]`` (called through
  # ``apply``); None: the family is not a sparsity pattern (low-rank, kernel, learned mixing).
  pattern_kind: ClassVar[str | None] = None
  # Whether the family keeps non-parameter variables it updates in training (routing's
  # centroids in the "state" collection).
  mutable_state: ClassVar[bool] = False
  # Options whose default (None) is derived from the input or from other options, and
  # how (shown by ``effx.attention.options(name)``).
  derived_defaults: ClassVar[dict[str, str]] = {}
  # Whether ``decode_init`` / ``decode_step`` run the causal family one token at a time
  # (``effx.attention.decoding``); the others are decoded by recomputing over the prefix.
  decodable: ClassVar[bool] = False
  # The implementations the family runs on besides "auto" (``effx.attention.backends``):
  # "xla" (plain XLA ops, every device); "pallas" (the block-sparse Pallas kernel: Triton
  # on a GPU, interpret mode elsewhere); "splash" (TPU splash attention through the same
  # kernel seam, interpret mode elsewhere); "cudnn" (``jax.nn.dot_product_attention``).
  backends: ClassVar[tuple[str, ...]] = ("xla",)
  # Parameters (by name) the training step clamps to [low, high] after every update
  # (adaptive span's span fraction in [0, 1]).
  bounds: ClassVar[dict[str, tuple[float, float]]] = {}
  # Whether the family sows a training loss term into the "losses" collection (and
  # values to report into "metrics"), which every objective adds (adaptive span's
  # penalty on long spans).
  auxiliary_loss: ClassVar[bool] = False

  def __post_init__(self):
    if self.causal and not self.supports_causal:
      causal_ok = [n for n in registry.names() if registry.supports_causal(n)]
      raise ValueError(
          f"attention family {self.family_name!r} does not support causal=True; "
          f"causal families: {', '.join(causal_ok)}")
    self.check_backend()
    self.check_options()
    super().__post_init__()

  def check_backend(self) -> None:
    """Raises ``ValueError`` when ``implementation`` is not "auto" or one of ``backends``."""
    if self.implementation != "auto" and self.implementation not in self.backends:
      raise ValueError(
          f"attention family {self.family_name!r} has no implementation="
          f"{self.implementation!r}; it runs on: 'auto', {', '.join(map(repr, self.backends))}")

  def check_options(self) -> None:
    """Raises ``ValueError`` naming the first invalid option. Default: nothing to check."""

  def decode_init(self, batch: int, heads: int, head_dim: int, head_dim_v: int,
                  capacity: int, dtype=jnp.float32) -> dict[str, jax.Array]:
    """The decoding state before the first token of sequences of up to ``capacity``
    tokens (``effx.attention.decoding``)."""
    raise NotImplementedError(f"attention family {self.family_name!r} has no incremental "
                              "decoding")

  def decode_step(self, q: jax.Array, k: jax.Array, v: jax.Array, state: dict,
                  position: jax.Array, valid: jax.Array) -> tuple[jax.Array, dict]:
    """One token: ``q, k, v [batch, heads, dim]``, ``position, valid [batch]`` ->
    ``(out [batch, heads, dim_v], state)``, equal to the causal forward's output there."""
    raise NotImplementedError(f"attention family {self.family_name!r} has no incremental "
                              "decoding")


def check_positive(family: str, option: str, value: Any, *, allow_none: bool = False) -> None:
  if value is None and allow_none:
    return
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{family}: option {option}={value!r} must be a positive integer")


def check_choice(family: str, option: str, value: Any, choices: Iterable[Any]) -> None:
  choices = tuple(choices)
  if value not in choices:
    raise ValueError(
        f"{family}: option {option}={value!r} is not one of {', '.join(map(repr, choices))}"
    )


def check_qkv(family: str, q: jax.Array, k: jax.Array, v: jax.Array,
              mask: jax.Array | None) -> jax.Array | None:
  """Checks the shared call contract and returns the mask as bool (or None).

  Args:
    family: name used in error messages.
    q, k: ``[batch, length, heads, head_dim]``, same shape.
    v: ``[batch, length, heads, head_dim_v]``.
    mask: optional ``[batch, length]`` padding mask (True = real token); any dtype that
      casts to bool.
  """
  if q.ndim != 4:
    raise ValueError(
        f"{family}: q must be [batch, length, heads, head_dim], got shape {q.shape}")
  if k.shape != q.shape:
    raise ValueError(f"{family}: k has shape {k.shape} but q has {q.shape}; they must match")
  if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
    raise ValueError(
        f"{family}: v must be [batch, length, heads, head_dim_v] matching q's first three "
        f"dims {q.shape[:3]}, got {v.shape}")
  if mask is None:
    return None
  if mask.shape != q.shape[:2]:
    raise ValueError(
        f"{family}: mask must be [batch, length] = {q.shape[:2]}, got {mask.shape}")
  return mask.astype(jnp.bool_)


def zero_padded_queries(out: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Zeros the outputs of padded query positions. out: [batch, length, heads, dim]."""
  if mask is None:
    return out
  return jnp.where(mask[:, :, None, None], out, jnp.zeros((), out.dtype))

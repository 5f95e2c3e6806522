"""Reversible residual stack (RevNet, Gomez et al. 2017; Reformer, Kitaev et al. 2020).

The width is split into two streams and each layer computes
``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)`` with ``F`` the pre-norm attention sub-block and
``G`` the pre-norm feed-forward sub-block, each of half the width. A ``jax.custom_vjp``
saves only the last layer's outputs; the backward pass walks the layers in reverse,
reconstructing each layer's inputs from its outputs (``x2 = y2 - G(y1)``,
``x1 = y1 - F(x2)``) and back-propagating through one layer at a time, so activation
memory does not grow with depth. Both walks are ``lax.scan`` loops over parameters
stacked on a leading layer axis: a loop keeps XLA from scheduling the reconstructions
early, which in straight-line code would keep every layer alive again.

Randomness is replayed exactly: each layer's sub-blocks get explicit dropout keys, split
once from the ``"dropout"`` stream, and the reconstruction calls them with the same keys
(dropout masks, LSH rotations and Performer redraws alike). Families with mutable state
(routing's centroids) are refused: the recomputation would update them twice.

Per-layer outputs and attention outputs are returned too (for distillation and probing);
their cotangents are added during the reverse walk, so losses on them are exact.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from effx.common import axes
from effx.layers.config import BlockConfig
from effx.layers.sublayers import AttentionSublayer, FeedForwardSublayer


def check_reversible(config: BlockConfig) -> None:
  """Raises ``ValueError`` if ``config`` cannot run reversibly."""
  if config.emb_dim % 2:
    raise ValueError(f"model.reversible=True splits the width into two streams: "
                     f"model.emb_dim={config.emb_dim} must be even")
  if config.has_mutable_state:
    raise ValueError(f"model.attention={config.attention!r} keeps mutable state that the "
                     "reversible backward pass would update twice; use model.reversible=False")
  if config.has_auxiliary_loss:
    raise ValueError(f"model.attention={config.attention!r} adds a loss term of its own, "
                     "which the reversible stack's hand-written backward pass does not "
                     "carry; use model.reversible=False")
  if config.norm != "pre":
    raise ValueError("model.reversible=True needs pre-norm sub-blocks (model.norm='pre'): "
                     "a LayerNorm after the residual sum cannot be inverted")
  if config.remat != "none":
    raise ValueError(f"model.reversible=True already recomputes every layer; set "
                     f"model.remat='none' (got {config.remat!r})")


def _stack_axis(tree):
  """Prepends the ``layers`` logical axis to every partitioned parameter."""
  def add(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return leaf.replace(names=(axes.LAYERS, *leaf.names))
    return leaf
  return jax.tree.map(add, tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


class ReversibleStack(nn.Module):
  """``num_layers`` reversible layers over ``[batch, length, emb_dim]``.

  ``__call__(x, mask, deterministic, positions=None)`` returns
  ``(y, {"hidden": [layers, batch, length, emb_dim], "attention": [layers, batch,
  length, emb_dim // 2]})``. Parameters: ``attention`` and ``feed_forward`` sub-trees,
  each stacked over layers.
  """

  config: BlockConfig
  num_layers: int

  def __post_init__(self):
    check_reversible(self.config)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool,
               positions: jax.Array | None = None):
    half = x.shape[-1] // 2
    f_def = AttentionSublayer(self.config, half, parent=None)
    g_def = FeedForwardSublayer(self.config, half, parent=None)
    x1, x2 = x[..., :half], x[..., half:]

    def init_stacked(definition, *args):
      def init(rng):
        one = lambda r: definition.init(r, *args)["params"]  # noqa: E731
        return _stack_axis(jax.vmap(one)(jax.random.split(rng, self.num_layers)))
      return init

    params = {
        "attention": self.param("attention", init_stacked(f_def, x2, mask, True, positions)),
        "feed_forward": self.param("feed_forward", init_stacked(g_def, x1, True)),
    }
    keys = None
    if not deterministic:
      keys = jax.random.split(self.make_rng("dropout"), (self.num_layers, 2))
    run = _reversible_fn(f_def, g_def, deterministic)
    y1, y2, hidden, attention = run(params, x1, x2, mask, positions, keys)
    return jnp.concatenate([y1, y2], axis=-1), {"hidden": hidden, "attention": attention}


def _reversible_fn(f_def: nn.Module, g_def: nn.Module, deterministic: bool):
  """The custom-VJP function for one pair of sub-block definitions."""

  def f(params, x, mask, positions, key):
    rngs = None if key is None else {"dropout": key}
    return f_def.apply({"params": params}, x, mask, deterministic, positions, rngs=rngs)

  def g(params, x, key):
    rngs = None if key is None else {"dropout": key}
    return g_def.apply({"params": params}, x, deterministic, rngs=rngs)

  def split(keys):
    return (None, None) if keys is None else (keys[..., 0, :], keys[..., 1, :])

  def forward(params, x1, x2, mask, positions, keys):
    kf, kg = split(keys)

    def layer(carry, xs):
      x1, x2 = carry
      p, kf, kg = xs
      f_out = f(p["attention"], x2, mask, positions, kf)
      y1 = x1 + f_out
      y2 = x2 + g(p["feed_forward"], y1, kg)
      return (y1, y2), (jnp.concatenate([y1, y2], axis=-1), f_out)

    (y1, y2), (hidden, attention) = jax.lax.scan(layer, (x1, x2), (params, kf, kg))
    return y1, y2, hidden, attention

  @jax.custom_vjp
  def run(params, x1, x2, mask, positions, keys):
    return forward(params, x1, x2, mask, positions, keys)

  def run_fwd(params, x1, x2, mask, positions, keys):
    out = forward(params, x1, x2, mask, positions, keys)
    return out, (params, out[0], out[1], mask, positions, keys)

  def run_bwd(res, cotangents):
    params, y1, y2, mask, positions, keys = res
    dy1, dy2, d_hidden, d_attention = cotangents
    half = y1.shape[-1]
    kf, kg = split(keys)

    def layer(carry, xs):
      y1, y2, dy1, dy2 = carry
      p, kf, kg, dh, da = xs
      dy1 = dy1 + dh[..., :half]
      dy2 = dy2 + dh[..., half:]
      # Undo y2 = x2 + G(y1).
      g_out, g_vjp = jax.vjp(lambda p, y: g(p, y, kg), p["feed_forward"], y1)
      x2 = y2 - g_out
      d_g, dy1_from_g = g_vjp(dy2)
      dy1 = dy1 + dy1_from_g
      # Undo y1 = x1 + F(x2).
      f_out, f_vjp = jax.vjp(lambda p, x: f(p, x, mask, positions, kf), p["attention"], x2)
      x1 = y1 - f_out
      d_f, dx2_from_f = f_vjp(dy1 + da)
      return (x1, x2, dy1, dy2 + dx2_from_f), {"attention": d_f, "feed_forward": d_g}

    (_, _, dx1, dx2), grads = jax.lax.scan(
        layer, (y1, y2, dy1, dy2), (params, kf, kg, d_hidden, d_attention), reverse=True)
    return grads, dx1, dx2, None, None, None

  run.defvjp(run_fwd, run_bwd)
  return run

"""How families that draw random numbers (LSH rotations, Performer features, Sinkhorn's
Gumbel noise) get them.

* ``deterministic=True`` (evaluation), or ``redraw=False``: a fixed draw per layer, from
  ``PRNGKey(seed)`` folded with a hash of the module's path. The family is then a pure
  function of its inputs, and different layers use different draws.
* ``deterministic=False`` and ``redraw=True`` (training): a fresh draw on every call, from
  the ``"dropout"`` RNG stream that every training step provides
  (``model.apply(..., rngs={"dropout": key})``).
"""

from __future__ import annotations

import zlib

import flax.linen as nn
import jax


def family_key(module: nn.Module, *, seed: int, redraw: bool, deterministic: bool) -> jax.Array:
  """The PRNG key ``module`` should draw from this call (module docstring)."""
  if redraw and not deterministic:
    return module.make_rng("dropout")
  path = "/".join(module.scope.path) if module.scope is not None else ""
  return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(path.encode()) & 0x7FFFFFFF)

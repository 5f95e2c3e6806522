"""Allow-patterns of the sparse families, as arrays and as pictures drawn from the code."""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import numpy as np

from effx.attention import registry


def pattern_names() -> tuple[str, ...]:
  """Families that have an allow-pattern."""
  return tuple(n for n in registry.names() if registry.get(n).pattern_kind is not None)


def pattern(name: str, length: int, *, num_heads: int = 1, causal: bool = False,
            seed: int = 0, **options: Any) -> np.ndarray:
  """The boolean allow-matrix ``[num_heads, length, length]`` of family ``name``.

  Content-based families (``lsh``, ``routing``) depend on the inputs; for them the
  pattern is drawn for random queries and keys from ``seed`` (batch of one).
  """
  if not isinstance(length, int) or length <= 0:
    raise ValueError(f"pattern: length={length!r} must be a positive integer")
  module = registry.make(name, causal=causal, **options)
  if module.pattern_kind == "static":
    return np.asarray(module.allow_matrix(length, num_heads))
  if module.pattern_kind == "content":
    q, k = jax.random.normal(jax.random.PRNGKey(seed), (2, 1, length, num_heads, 16))
    variables = jax.jit(module.init)(jax.random.PRNGKey(seed), q, k, q)
    draw = jax.jit(functools.partial(module.apply, method="allow_matrix"))
    return np.asarray(draw(variables, q, k))[0]
  raise ValueError(f"attention family {name!r} has no sparsity pattern; families with one: "
                   f"{', '.join(pattern_names())}")


def plot_pattern(name: str, length: int, path: str | os.PathLike | None = None, *,
                 num_heads: int = 1, causal: bool = False, seed: int = 0,
                 **options: Any) -> str:
  """Saves a PNG of family ``name``'s allow-pattern (one panel per head, at most 4).

  Args:
    name: a family with a pattern (``pattern_names()``).
    length: sequence length.
    path: output file; default ``"<name>_pattern.png"`` in the working directory.
    num_heads: heads to draw (patterns differ per head for ``bigbird`` random blocks,
      per-head ``dilated``, and the content-based families).
    causal, seed, options: as for ``pattern``.

  Returns:
    The path written.
  """
  import matplotlib  # noqa: PLC0415 (plotting is optional at import time)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415 (matplotlib only for the picture)

  allowed = pattern(name, length, num_heads=num_heads, causal=causal, seed=seed, **options)
  shown = allowed[:4]
  fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4), squeeze=False)
  for head, ax in enumerate(axes[0]):
    ax.imshow(shown[head], cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    ax.set_title(f"head {head}: {100 * shown[head].mean():.1f}% allowed", fontsize=9)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
  described = ", ".join(f"{k}={v}" for k, v in options.items())
  fig.suptitle(f"{name}{' (causal)' if causal else ''}  L={length}"
               f"{'  ' + described if described else ''}", fontsize=10)
  fig.tight_layout()
  path = os.fspath(path or f"{name}_pattern.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path

"""Name -> attention family registry.

Each family module registers its Linen class with ``@register("name")``; configs select
a family by that string and pass its options as keyword arguments (``make``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypeVar

import flax.linen as nn

_FAMILIES: dict[str, type[nn.Module]] = {}

# Dataclass fields every Linen module has; they are not family options.
_NOT_OPTIONS = frozenset({"parent", "name", "causal"})

M = TypeVar("M", bound=type[nn.Module])


def register(name: str) -> Callable[[M], M]:
  """Class decorator that registers an attention family under ``name``."""

  def wrap(cls: M) -> M:
    if name in _FAMILIES:
      raise ValueError(f"attention family {name!r} is already registered")
    cls.family_name = name
    _FAMILIES[name] = cls
    return cls

  return wrap


def names() -> tuple[str, ...]:
  """Every registered family name, in registration order."""
  return tuple(_FAMILIES)


def get(name: str) -> type[nn.Module]:
  """The Linen class of family ``name``; unknown names list the registered ones."""
  try:
    return _FAMILIES[name]
  except KeyError:
    raise ValueError(
        f"unknown attention family {name!r}; registered families: {', '.join(names())}"
    ) from None


class Options(dict):
  """A family's options and their defaults (a plain dict), with ``notes``: for each
  option whose default (``None``) is derived from the input or other options, how.
  Printed, the notes follow their options as comments."""

  def __init__(self, defaults: dict[str, Any], notes: dict[str, str]):
    super().__init__(defaults)
    self.notes = dict(notes)

  def __repr__(self) -> str:
    if not self.notes:
      return super().__repr__()
    lines = [f"  {k!r}: {v!r},"
             + (f"  # {self.notes[k]}" if k in self.notes else "") for k, v in self.items()]
    return "{\n" + "\n".join(lines) + "\n}"


def options(name: str) -> Options:
  """The options family ``name`` accepts, with their defaults (``Options``: a dict whose
  ``notes`` say how a default derived from the input is chosen)."""
  cls = get(name)
  notes = {**getattr(cls, "derived_defaults", {}),
           "implementation": "'auto' or one of " + ", ".join(map(repr, backends(name)))}
  return Options({f.name: f.default for f in dataclasses.fields(cls)
                  if f.init and f.name not in _NOT_OPTIONS}, notes)


def backends(name: str) -> tuple[str, ...]:
  """The implementations family ``name`` runs on (its ``implementation`` option also
  takes ``"auto"``): ``"xla"`` everywhere, ``"pallas"`` for the families on the
  block-sparse kernel, ``"splash"`` for those of them whose layouts are static,
  ``"cudnn"`` for dense."""
  return tuple(getattr(get(name), "backends", ("xla",)))


def parameter_bounds() -> dict[str, tuple[float, float]]:
  """``{parameter name: (low, high)}`` over every family: the training step clamps
  parameters of these names to their bounds after each update (``Family.bounds``)."""
  out: dict[str, tuple[float, float]] = {}
  for cls in _FAMILIES.values():
    for param, bound in getattr(cls, "bounds", {}).items():
      if out.setdefault(param, bound) != bound:
        raise ValueError(f"parameter {param!r} has two bounds: {out[param]} and {bound}")
  return out


def supports_causal(name: str) -> bool:
  """Whether family ``name`` can run with ``causal=True``."""
  return getattr(get(name), "supports_causal", True)


_UNSET = object()


def make(name: str, *, causal: bool = False, module_name: str | None = None,
         parent: Any = _UNSET, **kwargs: Any) -> nn.Module:
  """Builds family ``name`` with ``causal`` and its options.

  Unknown options raise a ``TypeError`` listing the valid ones; invalid values, and
  ``causal=True`` for a family that cannot be causal, raise a ``ValueError`` naming the
  option (each family checks its options on construction). ``parent=None`` builds an
  unattached module even inside another module's ``compact`` method.
  """
  cls = get(name)
  valid = options(name)
  unknown = sorted(set(kwargs) - set(valid))
  if unknown:
    raise TypeError(
        f"attention family {name!r} has no option(s) {', '.join(map(repr, unknown))}; "
        f"its options are: {', '.join(valid) or '(none)'}"
    )
  if parent is not _UNSET:
    kwargs["parent"] = parent
  return cls(causal=causal, name=module_name, **kwargs)

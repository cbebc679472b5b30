"""Frozen dataclasses as pytrees whose numeric fields are leaves and whose options are static.

`value_class(cls, static=(...))` registers a frozen dataclass with JAX: the fields named in
`static` (strings, flags, integer bounds, arbitrary callables) go into the treedef, every other
field is a child (a number, an array, None, or a pytree such as a `PowerDecay`), so the value can
be passed through `jit`, `vmap` and `lax.scan` and its numbers traced or batched.

Unflattening does not call `__init__`: JAX rebuilds trees with tracers, `None`s or sharding specs
in the leaves (vmap's `in_axes`, `tree.map`), which `__post_init__` validation must not see.
Validation therefore runs when a user builds a value, and only on concrete numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jax import tree_util


def value_class(cls: type, static: Sequence[str] = ()) -> type:
  """Register the frozen dataclass `cls` as a pytree; returns `cls`."""
  names = tuple(f.name for f in dataclasses.fields(cls))
  unknown = set(static) - set(names)
  if unknown:
    raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}.")
  data = tuple(n for n in names if n not in static)
  meta = tuple(n for n in names if n in static)

  def flatten_with_keys(value):
    children = tuple((tree_util.GetAttrKey(n), getattr(value, n)) for n in data)
    return children, tuple(getattr(value, n) for n in meta)

  def flatten(value):
    return tuple(getattr(value, n) for n in data), tuple(getattr(value, n) for n in meta)

  def unflatten(aux, children):
    value = object.__new__(cls)
    for n, v in zip(meta, aux):
      object.__setattr__(value, n, v)
    for n, v in zip(data, children):
      object.__setattr__(value, n, v)
    return value

  tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
  return cls

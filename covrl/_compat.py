"""What differs between the JAX releases covrl supports (0.7 to the newest).

Only what covrl itself needs: each helper picks the spelling the installed JAX has, so the same
code runs on Colab's pinned JAX and on the newest release.
"""

from __future__ import annotations

import contextlib

import jax
from jax.sharding import NamedSharding, PartitionSpec


def enable_x64(enabled: bool = True) -> contextlib.AbstractContextManager:
  """A context manager that turns 64-bit JAX on (or off) inside its block.

  JAX >= 0.8 spells it `jax.enable_x64`; earlier releases (Colab's 0.7.2 among them) only have
  `jax.experimental.enable_x64`, which later releases removed.
  """
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(enabled)
  from jax.experimental import enable_x64 as experimental_enable_x64

  return experimental_enable_x64(enabled)


def unsharded(x: jax.Array) -> jax.Array:
  """`x` with no explicit sharding: a no-op except under a mesh of Explicit axes.

  Some operations (`lax.top_k` along a sharded axis) refuse an explicitly sharded operand; the
  exact global selection needs all of the (small, one score per token) array anyway, so it is
  gathered once. Under Auto axes and shard_map, arrays carry no explicit sharding and pass
  through unchanged. The target is a NamedSharding on the array's own mesh, so no mesh context
  (`jax.set_mesh`) is needed around the call: arrays put on a mesh and passed to a jitted
  function are enough, as the manual's guide to devices says.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec is None or all(axis is None for axis in spec):
    return x
  return jax.sharding.reshard(x, NamedSharding(sharding.mesh, PartitionSpec()))

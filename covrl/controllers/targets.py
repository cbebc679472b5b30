"""Target entropy paths H*(t): plain callables `t -> H*` in nats, t the number of updates so far.

Any callable that maps an array of steps to an array of entropies is a target (an optax
schedule, a lambda). Three common shapes are provided as small frozen callables that also know
their range in closed form (a `bounds()` method, which any target may define); any other
callable is checked on t = 0..num_steps. A number is the constant path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from covrl import _checks

Target = Callable[[jax.Array], jax.Array]


def _check_entropy_value(name: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number of nats, got {value!r}.")
  return float(value)


def _as_float_steps(t: jax.Array | int) -> jax.Array:
  t = jnp.asarray(t)
  # Integer steps become the default float (float64 under 64-bit JAX).
  return t if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(jnp.result_type(float))


@dataclasses.dataclass(frozen=True)
class ConstantTarget:
  """H*(t) = value."""

  value: float

  def __call__(self, t: jax.Array | int) -> jax.Array:
    tf = _as_float_steps(t)
    return jnp.full(tf.shape, self.value, tf.dtype)

  def bounds(self) -> tuple[float, float]:
    return self.value, self.value


@dataclasses.dataclass(frozen=True)
class LinearTarget:
  """H*(t) moves linearly from init_value (t = 0) to end_value (t = num_steps), then stays."""

  init_value: float
  end_value: float
  num_steps: int

  def __call__(self, t: jax.Array | int) -> jax.Array:
    frac = jnp.clip(_as_float_steps(t) / self.num_steps, 0.0, 1.0)
    return self.init_value + (self.end_value - self.init_value) * frac

  def bounds(self) -> tuple[float, float]:
    return min(self.init_value, self.end_value), max(self.init_value, self.end_value)


@dataclasses.dataclass(frozen=True)
class ExponentialTarget:
  """H*(t) = end_value + (init_value - end_value) 2^(-t / half_life): decays to end_value."""

  init_value: float
  end_value: float
  half_life: float

  def __call__(self, t: jax.Array | int) -> jax.Array:
    decay = jnp.exp2(-_as_float_steps(t) / self.half_life)
    return self.end_value + (self.init_value - self.end_value) * decay

  def bounds(self) -> tuple[float, float]:
    return min(self.init_value, self.end_value), max(self.init_value, self.end_value)


def constant_target(value: float) -> ConstantTarget:
  """H*(t) = value."""
  return ConstantTarget(_check_entropy_value("value", value))


def linear_target(init_value: float, end_value: float, num_steps: int) -> LinearTarget:
  """H*(t) moves linearly from init_value (t = 0) to end_value (t = num_steps), then stays."""
  _checks.check_int("num_steps", num_steps, 1)
  return LinearTarget(_check_entropy_value("init_value", init_value),
                      _check_entropy_value("end_value", end_value), num_steps)


def exponential_target(init_value: float, end_value: float, half_life: float
                       ) -> ExponentialTarget:
  """H*(t) = end_value + (init_value - end_value) 2^(-t / half_life): decays to end_value."""
  if not (isinstance(half_life, int | float) and math.isfinite(half_life) and half_life > 0):
    raise ValueError(f"half_life must be a finite number of steps > 0, got {half_life!r}.")
  return ExponentialTarget(_check_entropy_value("init_value", init_value),
                           _check_entropy_value("end_value", end_value), float(half_life))


def as_target(target: Any) -> Target:
  """A target callable from a number (the constant path) or a callable (itself)."""
  if isinstance(target, int | float) and not isinstance(target, bool):
    return constant_target(target)
  if callable(target):
    return target
  raise TypeError(f"target must be a number or a callable t -> H*(t), got {target!r}.")


def target_bounds(target: Target, num_steps: int | None = None) -> tuple[float, float]:
  """(min, max) of a path: its `bounds()` when it has one, else its values on t = 0..num_steps."""
  bounds = getattr(target, "bounds", None)
  if callable(bounds):
    low, high = (float(v) for v in bounds())
    return low, high
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
    raise ValueError("a target given as a callable needs num_steps (the steps on which to check "
                     f"it lies in [0, log V]), got {num_steps!r}.")
  # Evaluated eagerly even when a controller is built inside jit (the steps are constants).
  with jax.ensure_compile_time_eval():
    values = np.asarray(target(jnp.arange(num_steps + 1)), np.float64)
  if values.shape != (num_steps + 1,):
    raise ValueError(f"a target callable must map a [T] array of steps to a [T] array, got "
                     f"shape {values.shape}.")
  if not np.all(np.isfinite(values)):
    raise ValueError("the target path is not finite on t = 0..num_steps.")
  return float(values.min()), float(values.max())


def check_target(target: Target, vocab_size: int, num_steps: int | None = None) -> None:
  """Raise ValueError unless the path stays in [0, log vocab_size] (the possible entropies)."""
  _checks.check_int("vocab_size", vocab_size, 2)
  low, high = target_bounds(target, num_steps)
  top = math.log(vocab_size)
  # A path may touch the bounds; a relative slack absorbs float32 round-off of log V itself.
  if low < 0 or high > top * (1 + 1e-6):
    raise ValueError(f"the target entropy path leaves [0, log V] = [0, {top:.6g}] nats "
                     f"(V = {vocab_size}): it ranges over [{low:.6g}, {high:.6g}].")

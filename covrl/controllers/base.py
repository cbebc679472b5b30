"""What every controller shares: the `Controller` pair of functions and the checks of its inputs.

A controller is `Controller(init, update, ...)`: `state = init()`, then before each update
`coef, state = update(state, entropy, predict)`. Each controller has a state type of its own
(a NamedTuple of scalars); every state type carries the same report fields, which the labs log::

  count      [] int32, updates chosen so far (t)
  coef       [] the strength chosen last (c_{t-1}); the initial strength before the first
  target     [] H*(t) of the last update
  error      [] the last tracking error H*(t) - H_t
  predicted  [] predicted entropy change of the chosen strength (0 for controllers that do not
             predict)
  saturated  [] bool, the last strength was clipped to [c_min, c_max] or had no authority
  nonfinite  [] bool, the last measurement or prediction was not finite and the previous
             strength was kept

A non-finite measured entropy raises when it is concrete; under jit the update it belongs to is
skipped (`guarded`): the previous strength is returned, the rule's own state (level, integral,
last error) is kept, `count` advances (the target path stays on the training's clock) and
`nonfinite` is set. So a NaN reading never becomes a NaN strength or a NaN state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from covrl import _checks
from covrl.controllers import targets as tg

Predictor = Callable[[jax.Array], jax.Array]
#: The fields every controller state type carries (what the labs log).
REPORT_FIELDS: tuple[str, ...] = ("count", "coef", "target", "error", "predicted", "saturated",
                                  "nonfinite")
# Report fields held in float32 whatever the computation's dtype (states have fixed dtypes).
_FLOAT_FIELDS = ("coef", "target", "error", "predicted", "level", "integral")


class Controller(NamedTuple):
  """An entropy controller: `init() -> state`, `update(state, entropy, predict=None)`.

  Attributes:
    init: () -> state (the controller's own state type).
    update: (state, entropy, predict=None) -> (coef, state). `entropy` is the measured (global)
      entropy H_t of the policy about to be updated; `predict(c)` the predicted (global) entropy
      change of the candidate update with strength c (needed by `predictive` only).
    name: "fixed", "reactive", "pid", "predictive" or "switch".
    coef_range: (c_min, c_max).
    vocab_size: V of the target check (None for `fixed`).
    needs_prediction: whether `update` uses `predict`.
  """

  init: Callable[[], Any]
  update: Callable[..., tuple[jax.Array, Any]]
  name: str
  coef_range: tuple[float, float]
  vocab_size: int | None
  needs_prediction: bool


def state_type(name: str, doc: str, *extra: str, module: str) -> type:
  """A controller's state type: a NamedTuple of the report fields and then `extra` fields."""
  cls = NamedTuple(name, [(field, jax.Array) for field in (*REPORT_FIELDS, *extra)])
  cls.__doc__, cls.__module__ = doc, module
  return cls


def report_init(state_type: type, init_coef: Any, **fields: Any):
  """The initial state of `state_type`: report fields zeroed, coef = init_coef, then `fields`."""
  zero = jnp.zeros((), jnp.float32)
  values = dict(count=jnp.zeros((), jnp.int32), coef=jnp.asarray(init_coef, jnp.float32),
                target=zero, error=zero, predicted=zero, saturated=jnp.zeros((), bool),
                nonfinite=jnp.zeros((), bool))
  values.update(fields)
  return state_type(**values)


def advance(state, coef: jax.Array, dtype, **changes) -> tuple[jax.Array, Any]:
  """(coef in the computation dtype, the next state with its fixed field dtypes)."""
  fixed = {k: jnp.asarray(v, jnp.float32 if k in _FLOAT_FIELDS else getattr(state, k).dtype)
           for k, v in changes.items()}
  new = state._replace(count=state.count + 1, coef=jnp.asarray(coef, jnp.float32), **fixed)
  return jnp.asarray(coef, dtype), new


def check_range(coef_range: Any) -> tuple[float, float]:
  try:
    low, high = (float(v) for v in coef_range)
  except (TypeError, ValueError):
    raise ValueError(f"coef_range must be a pair (c_min, c_max), got {coef_range!r}.") from None
  if not (math.isfinite(low) and math.isfinite(high) and low < high):
    raise ValueError(f"coef_range needs finite c_min < c_max, got {coef_range!r}.")
  return low, high


def check_init(init_coef: Any, low: float, high: float) -> float:
  c = _checks.concrete_float(init_coef)
  if c is None or not (low <= c <= high):
    raise ValueError(f"init_coef must be a number in coef_range [{low}, {high}], got "
                     f"{init_coef!r}.")
  return c


def gain(name: str, value: Any, ok: Callable[[float], bool], rule: str) -> Any:
  """A gain as a float when concrete (checked against `ok`), or the traced value unchanged.

  Gains may be traced so that a sweep over them is one vmapped, compiled program; as everywhere
  in covrl, value checks then run only on concrete values.
  """
  if isinstance(value, bool):
    raise ValueError(f"{name} must be a number, got {value!r}.")
  v = _checks.concrete_float(value)
  if v is None:
    if _checks.is_concrete(value):
      raise ValueError(f"{name} must be a scalar number, got {value!r}.")
    return value
  if not (math.isfinite(v) and ok(v)):
    raise ValueError(f"{name} must be {rule}, got {value!r}.")
  return v


def measured(entropy: Any) -> jax.Array:
  h = _checks.check_float_array("entropy", entropy)
  if h.ndim != 0:
    raise ValueError(f"entropy must be a scalar (the pooled, global entropy), got shape "
                     f"{h.shape}.")
  if _checks.is_concrete(h) and not math.isfinite(float(h)):
    raise ValueError(f"entropy must be finite, got {float(h)} (a NaN or inf measurement: "
                     f"under jit the update is skipped and flagged in state.nonfinite).")
  return _checks.upcast(h)


def guarded(update: Callable[..., tuple[jax.Array, Any]]) -> Callable[..., tuple[jax.Array, Any]]:
  """`update` that skips a non-finite measurement (see the module docstring).

  The rule runs on a finite stand-in (0) and its result is discarded where the measurement was
  not finite, so no NaN reaches its arithmetic's gradients or its state.
  """

  def run(state, entropy, predict=None):
    h = measured(entropy)
    ok = jnp.isfinite(h)
    coef, new = update(state, jnp.where(ok, h, jnp.zeros_like(h)), predict)
    kept = state._replace(count=state.count + 1, nonfinite=jnp.ones((), bool))
    new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, kept)
    return jnp.where(ok, coef, state.coef.astype(coef.dtype)), new

  return run


def tracking_error(path: tg.Target, count: jax.Array, entropy: Any
                   ) -> tuple[jax.Array, jax.Array]:
  """(H*(t), e_t = H*(t) - H_t), in the measured entropy's (upcast) dtype."""
  h = measured(entropy)
  goal = path(count).astype(h.dtype)
  return goal, goal - h


def target_path(target: Any, vocab_size: int, num_steps: int | None) -> tg.Target:
  path = tg.as_target(target)
  tg.check_target(path, vocab_size, num_steps)
  return path

"""Coefficient and step-size schedules, with the annealing conditions of THEORY.md T3.4.

Any optax schedule (a callable `count -> value`) works wherever covrl takes a coefficient. The
schedules here are also callables, and in addition they know whether they meet the conditions the
asymptotic claims assume, so a bad combination fails before anything is compiled:

  step sizes:   sum_t eta_t = inf, and sum_t eta_t^2 < inf for sampled gradients (Robbins-Monro)
  coefficient:  sum_t eta_t beta_t < inf                             (summable bias)

beta_t -> 0 alone is not enough: proofs/T3_covariance_control.md#T3.4 gives a two-armed bandit
where a bias of size (t+1)^(-1/2) sends the iterates to the worst arm. The theorem proved there
also needs eta_t <= 1/(3L), a bound that depends on the problem and is checked by the caller.

For value(t) = v0 (1 + t / t0)^(-p): sum diverges iff p <= 1, square-summable iff p > 1/2,
vanishes iff p > 0 (or v0 = 0), and sum_t eta_t beta_t < inf iff p_eta + p_beta > 1.

References:
  Robbins & Monro, A Stochastic Approximation Method, Ann. Math. Statist. 22 (1951).
  Bertsekas & Tsitsiklis, Gradient Convergence in Gradient Methods with Errors, SIAM J. Optim.
  10(3) (2000).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from covrl import _checks
from covrl._pytree import value_class

Schedule = Callable[[jax.Array], jax.Array]
# A coefficient: a number (or a traced scalar), or a schedule `step -> value` (a PowerDecay or any
# optax schedule).
Coefficient = Any


def _finite(value: Any, minimum: float, strict: bool) -> bool:
  v = float(value)
  return math.isfinite(v) and (v > minimum if strict else v >= minimum)


@dataclasses.dataclass(frozen=True)
class PowerDecay:
  """value(t) = init_value * (1 + t / offset) ** (-power); power 0 is a constant.

  A pytree: its three numbers are leaves, so a schedule can be traced and vmapped (a sweep over
  initial values or powers in one compiled program). Checked when built from Python numbers.

  Attributes:
    init_value: value at t = 0, finite and >= 0.
    power: decay exponent p >= 0.
    offset: time scale t0 > 0 of the decay.
  """

  init_value: Any
  power: Any
  offset: Any = 1.0

  def __post_init__(self):
    for name, minimum, strict in (("init_value", 0.0, False), ("power", 0.0, False),
                                  ("offset", 0.0, True)):
      value = getattr(self, name)
      if isinstance(value, int | float) and not _finite(value, minimum, strict):
        raise ValueError(f"{name} must be finite and {'>' if strict else '>='} {minimum:g}, "
                         f"got {value!r}.")

  def factor(self, count: jax.Array | int, dtype: Any = jnp.float32) -> jax.Array:
    """(1 + t / offset) ** (-power): the schedule divided by its initial value, in `dtype`."""
    t = jnp.asarray(count, dtype)
    return (1.0 + t / self.offset) ** (-self.power)

  def __call__(self, count: jax.Array | int) -> jax.Array:
    return self.init_value * self.factor(count)

  @property
  def vanishes(self) -> bool:
    return self.power > 0 or self.init_value == 0

  @property
  def sum_diverges(self) -> bool:
    return self.init_value > 0 and self.power <= 1

  @property
  def square_summable(self) -> bool:
    return self.init_value == 0 or self.power > 0.5

  @property
  def max_value(self) -> float:
    return float(self.init_value)


value_class(PowerDecay)


@dataclasses.dataclass(frozen=True)
class GeometricRamp:
  """value(t) = start * (end / start) ** min(t / steps, 1): geometric from start to end over
  `steps` steps, then end (a continuation, or homotopy: a regularised problem solved at a large
  coefficient and followed to a small one; start = end is a constant, 0 included).

  A pytree: start and end are leaves (they can be traced and vmapped), `steps` is static.

  Attributes:
    start, end: finite values, both > 0 or both equal.
    steps: the ramp's length, an int >= 1.
  """

  start: Any
  end: Any
  steps: int = 1

  def __post_init__(self):
    _checks.check_int("steps", self.steps, 1)
    values = [v for v in (self.start, self.end) if isinstance(v, int | float)]
    for v in values:
      if not _finite(v, 0.0, False):
        raise ValueError(f"a geometric ramp's values must be finite and >= 0, got {v!r}.")
    if len(values) == 2 and self.start != self.end and min(values) <= 0:
      raise ValueError(f"a geometric ramp between different values needs both > 0, got "
                       f"start={self.start!r}, end={self.end!r}.")

  def __call__(self, count: jax.Array | int) -> jax.Array:
    start, end = jnp.asarray(self.start, jnp.float32), jnp.asarray(self.end, jnp.float32)
    frac = jnp.minimum(jnp.asarray(count, jnp.float32) / self.steps, 1.0)
    same = start == end
    ratio = jnp.where(same, 1.0, end / jnp.where(same, 1.0, start))
    return jnp.where(same, start, start * ratio**frac)


value_class(GeometricRamp, static=("steps",))


@dataclasses.dataclass(frozen=True)
class Range:
  """The values a scheduled field accepts: `[low, high]`, or `(low, high]` with `low_open`.

  `value_at` checks a schedule's value against it at the step it is used: a concrete value
  outside raises; under jit the value is clamped into it (see `value_at`).
  """

  low: float = 0.0
  high: float = math.inf
  low_open: bool = False

  def __contains__(self, v: float) -> bool:
    above = v > self.low if self.low_open else v >= self.low
    return math.isfinite(v) and above and v <= self.high

  def __str__(self) -> str:
    if self.high == math.inf:
      return f"finite and {'>' if self.low_open else '>='} {self.low:g}"
    return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"

  def clamp(self, value: jax.Array) -> jax.Array:
    """`value` clamped into the range; a NaN or an infinity gives the lower end (an open lower
    end: the dtype's smallest positive normal number)."""
    value = jnp.asarray(value)
    dtype = value.dtype if jnp.issubdtype(value.dtype, jnp.floating) else jnp.float32
    value = value.astype(dtype)
    low = jnp.finfo(dtype).tiny if self.low_open and self.low == 0 else self.low
    low = jnp.asarray(low, dtype)
    return jnp.where(jnp.isfinite(value), jnp.clip(value, low, self.high), low)


#: Every coefficient, ratio and strength of covrl lies in one of these.
NONNEGATIVE = Range()
FRACTION = Range(0.0, 1.0)


def value_at(coef: Coefficient, step: jax.Array | int | None, name: str = "coef",
             domain: Range = NONNEGATIVE) -> Any:
  """A coefficient's value at `step`: the number itself, or the schedule evaluated there.

  A number is returned as it is (a Python float stays a Python float, so that callers keep
  exact host arithmetic where they have it; the field's own checks have run when it was set). A
  schedule needs `step`, and its value must be a scalar (else ValueError, also under jit). When
  that value is concrete (an eager call) and outside `domain` (by default finite and >= 0; each
  field passes its own: a fraction's [0, 1], STEER's (0, 1]) it raises ValueError naming the
  field and the step. Under jit it cannot raise: the value is clamped into `domain`, and a NaN
  or an infinity gives the domain's lower end, so a schedule that leaves the range never puts
  a NaN or an out-of-range value into a loss.
  """
  if callable(coef):
    if step is None:
      raise ValueError(f"{name} is a schedule: pass the optimisation step as `step=`.")
    value = coef(step)
    if jnp.ndim(value) != 0:
      raise ValueError(f"{name}'s schedule must give a scalar, got shape {jnp.shape(value)} at "
                       f"step {step!r}.")
    if not isinstance(value, jax.core.Tracer):
      v = float(value)
      if v not in domain:
        raise ValueError(f"{name}'s schedule gave {v!r} at step {step!r}; its values must be "
                         f"{domain}.")
      return value
    return domain.clamp(value)
  return coef


def is_annealed(coef: Coefficient) -> bool:
  """True for a schedule that is not a known constant (a PowerDecay of power 0 is constant)."""
  if isinstance(coef, PowerDecay):
    return not (isinstance(coef.power, int | float) and coef.power == 0)
  return callable(coef)


def upper_bound(coef: Coefficient) -> float | None:
  """A static upper bound on a coefficient's values: a number itself, a PowerDecay's first value
  (it never increases), a GeometricRamp's larger end, None for other schedules and traced
  values."""
  if isinstance(coef, GeometricRamp):
    ends = [v for v in (coef.start, coef.end) if isinstance(v, int | float)]
    return float(max(ends)) if len(ends) == 2 else None
  if isinstance(coef, PowerDecay):
    coef = coef.init_value
  if isinstance(coef, int | float) and not isinstance(coef, bool):
    return float(coef)
  return None


def constant(value: float) -> PowerDecay:
  """A constant schedule (power 0)."""
  return PowerDecay(float(value), 0.0)


def inverse_time(init_value: float, offset: float = 1.0) -> PowerDecay:
  """value(t) = init_value / (1 + t / offset): a Robbins-Monro step size or a vanishing coef."""
  return PowerDecay(float(init_value), 1.0, float(offset))


def power_decay(init_value: float, power: float, offset: float = 1.0) -> PowerDecay:
  """value(t) = init_value (1 + t / offset)^(-power)."""
  return PowerDecay(float(init_value), float(power), float(offset))


def robbins_monro(init_value: float, power: float = 1.0, offset: float = 1.0) -> PowerDecay:
  """A step-size schedule with sum eta = inf and sum eta^2 < inf: power in (1/2, 1]."""
  if not 0.5 < power <= 1.0:
    raise ValueError(f"a Robbins-Monro step size needs power in (1/2, 1], got {power!r}.")
  if init_value <= 0:
    raise ValueError(f"a step size needs init_value > 0, got {init_value!r}.")
  return PowerDecay(float(init_value), float(power), float(offset))


def as_power_decay(schedule: Any) -> PowerDecay | None:
  """A number as a constant PowerDecay, a PowerDecay as itself, anything else as None."""
  if isinstance(schedule, PowerDecay):
    return schedule
  if isinstance(schedule, int | float):
    return constant(float(schedule))
  return None


@dataclasses.dataclass(frozen=True)
class AnnealingReport:
  """Which of the T3.4 conditions a (step size, coefficient) pair meets."""

  step_sum_diverges: bool
  step_square_summable: bool
  coef_vanishes: bool
  bias_summable: bool

  exact_gradients: bool = False

  @property
  def ok(self) -> bool:
    """The conditions of the theorem in proofs/T3_covariance_control.md#T3.4."""
    steps = self.step_sum_diverges and (self.exact_gradients or self.step_square_summable)
    return steps and self.bias_summable


def annealing_report(step_size: Any, coef: Any, *, exact_gradients: bool = False
                     ) -> AnnealingReport:
  """Check a step-size schedule and a coefficient schedule against THEORY.md T3.4.

  Both must be numbers or covrl PowerDecay schedules (whose decay is known); an arbitrary
  callable raises TypeError, since its limit cannot be read off.

  Args:
    step_size: eta_t.
    coef: beta_t, the size of the control's perturbation (a coefficient or a ratio).
    exact_gradients: True for exact-gradient dynamics, where sum eta_t^2 < inf is not needed.
  """
  eta, beta = as_power_decay(step_size), as_power_decay(coef)
  for name, value, sched in (("step_size", step_size, eta), ("coef", coef, beta)):
    if sched is None:
      raise TypeError(
          f"{name}={value!r}: only numbers and covrl.schedules.PowerDecay can be checked "
          "against the annealing conditions."
      )
  bias_summable = beta.init_value == 0 or (eta.power + beta.power > 1)
  return AnnealingReport(eta.sum_diverges, eta.square_summable, beta.vanishes, bias_summable,
                         exact_gradients)


def check_annealing(step_size: Any, coef: Any, *, exact_gradients: bool = False
                    ) -> AnnealingReport:
  """Raise ValueError, naming what fails, unless the pair meets the T3.4 conditions."""
  report = annealing_report(step_size, coef, exact_gradients=exact_gradients)
  problems = []
  if not report.step_sum_diverges:
    problems.append("step sizes must not be summable (sum eta_t = inf; power <= 1)")
  if not (exact_gradients or report.step_square_summable):
    problems.append("sampled-gradient step sizes must be square-summable (sum eta_t^2 < inf; "
                    "power > 1/2)")
  if not report.bias_summable:
    problems.append(
        "the coefficient must anneal fast enough that sum_t eta_t beta_t < inf (powers adding up "
        "to more than 1); beta_t -> 0 alone is not enough (proofs/T3_covariance_control.md#T3.4)")
  if problems:
    raise ValueError(
        f"schedules do not meet the annealing conditions of THEORY.md T3.4: "
        f"{'; '.join(problems)} (step_size={step_size!r}, coef={coef!r})."
    )
  return report

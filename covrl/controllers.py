"""Closed-loop entropy control: choose a control's strength so that entropy follows a target path.

A control method has a strength c: the entropy-bonus coefficient alpha, KL-Cov's beta, or
Clip-Cov's token ratio r. Before update t a controller sets c_t from what is known at that time,
so that the entropy H_t of the policy (before update t) follows a target path H*(t):

  fixed(c)      c_t = c.
  reactive      the adaptive entropy control of Skywork-OR1 (He et al. 2025, Sec. 3.2), which TRL
                adopted (GRPOConfig.use_adaptive_entropy): a level moves by a fixed step toward
                the target and is applied only while entropy is below it,
                  level_{t+1} = clip(level_t + delta * (+1 if H_t < H*(t) else -1), c_min, c_max),
                  c_t = level_{t+1} * 1[H_t < H*(t)].
  pid           c_t = clip(c_0 + kp e_t + ki sum_{s<=t} e_s + kd (e_t - e_{t-1})),
                e_t = H*(t) - H_t, the integral frozen while the output saturates in the
                direction of e_t (anti-windup).
  predictive    uses the covariance predictor of THEORY.md T1 *before* the update. Given f(c), the
                predicted entropy change of the candidate update with strength c (first or second
                order, per context and pooled), it solves
                  f(c_t) = H*(t+1) - H*(t) + gain * (H*(t) - H_t)                       (1)
                for c_t in [c_min, c_max]. With an exact prediction the error e_t = H_t - H*(t)
                obeys e_{t+1} = (1 - gain) e_t: stable iff 0 < gain < 2 (checked when built),
                deadbeat at gain = 1.

Every controller is a pair of pure functions with an explicit `ControllerState` (optax style):
`state = controller.init()`, then before each update
`coef, state = controller.update(state, entropy, predict)`; both work under jit, vmap and scan.
`entropy` is the measured entropy of the current policy and `predict(c)` the predicted change;
on many devices both must be global statistics: build them with `covrl.entropy_prediction`
(`pooled_entropy`, `pooled_entropy_change`; pass `axis_name` inside `shard_map`; under plain jit
on globally sharded arrays the sums are global already). The controller is scalar arithmetic.
`controlled_entropy_bonus` wraps a controller and any optax optimiser into one gradient
transformation for a logit-parameterised policy.

Solving (1): f is evaluated through the caller's `predict`, so the controller does not care how
the candidate logit update dz(c) was obtained (exactly, for a logit-parameterised policy; as
J dtheta(c) by `jax.jvp` for a network, see `entropy_prediction.linearized_logit_update`).

  "secant"     f at c_min and c_max (one vmapped call) and the line through them. Exact when f is
               affine in c: the first-order predictor is linear in dz, and dz(c) is affine for
               one SGD step with the bonus coefficient or KL-Cov's beta as the knob.
  "bisection"  bracket [c_min, c_max], `num_iters` halvings, then the secant in the last bracket:
               for non-affine f (Adam, several inner steps, second-order prediction, Clip-Cov's
               ratio, whose effect is piecewise constant in r). Needs f(c) - target to change
               sign on the range; otherwise c saturates. Choose the range where f is monotone:
               the second-order prediction of a large step can turn back down (its -Var/2 term
               grows like c^2), and then a far end of the range looks "out of reach".
  "grid"       f at `num_points` evenly spaced strengths in one vmapped call, then the secant in
               the first bracket where f - target changes sign: the same uses as bisection, but
               one batched evaluation instead of a sequential loop (fewer, larger kernels).
  "newton"     one Newton step from the last coefficient, f' by `jax.jvp` in c: exact for affine
               f, one evaluation in forward mode; `predict` must support jax.jvp, and its
               tangent must be finite (Adam's sqrt(v) has an infinite derivative where v = 0,
               for parameters that never received a gradient: use "grid" there).

Saturation and failure: c stays in [c_min, c_max]. When the target change is out of reach the
coefficient saturates at the end whose prediction is closer (`state.saturated`). A prediction
that is not finite keeps the last coefficient and sets `state.nonfinite` (and counts it in
`state.num_nonfinite`); nothing becomes NaN. A target path outside [0, log V] and a gain outside
(0, 2) are rejected when the controller is built.

References:
  J. He et al., Skywork Open Reasoner 1 Technical Report, arXiv:2505.22312 (2025), Sec. 3.2
  ("adaptive entropy control"); github.com/SkyworkAI/Skywork-OR1 (verl/trainer/ppo/core_algos.py).
  G. Cui et al., The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models,
  arXiv:2505.22617 (2025), Lemma 1 (the covariance predictor).
  K. J. Astrom, R. M. Murray, Feedback Systems, Princeton University Press (2008), Ch. 10 (PID,
  integrator windup).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from covrl import _checks
from covrl import entropy_prediction as ep
from covrl import softmax_entropy as ent

Solver = Literal["secant", "bisection", "grid", "newton"]
SOLVERS: tuple[str, ...] = ("secant", "bisection", "grid", "newton")
Predictor = Callable[[jax.Array], jax.Array]


# ------------------------------------------------------------------------------------ targets


@dataclasses.dataclass(frozen=True)
class TargetPath:
  """A target entropy path H*(t) in nats, t the number of updates so far.

  kind "constant": H* = init_value. "linear": from init_value at t = 0 to end_value at
  t = num_steps, then constant. "exponential": end_value + (init_value - end_value) *
  2^(-t / half_life). "schedule": any callable `t -> H*` (an optax schedule), checked on
  t = 0..num_steps.

  Build one with `constant_target`, `linear_target`, `exponential_target` or `schedule_target`.
  """

  kind: Literal["constant", "linear", "exponential", "schedule"]
  init_value: float
  end_value: float
  num_steps: int = 1
  half_life: float = 1.0
  fn: Callable[[jax.Array], jax.Array] | None = None

  def __call__(self, t: jax.Array | int) -> jax.Array:
    t = jnp.asarray(t)
    if self.kind == "schedule":
      return jnp.asarray(self.fn(t))
    # Integer steps become the default float (float64 under jax.enable_x64).
    tf = t if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(jnp.result_type(float))
    h0, h1 = self.init_value, self.end_value
    if self.kind == "constant":
      return jnp.full(t.shape, h0, tf.dtype)
    if self.kind == "linear":
      frac = jnp.clip(tf / self.num_steps, 0.0, 1.0)
      return h0 + (h1 - h0) * frac
    return h1 + (h0 - h1) * jnp.exp2(-tf / self.half_life)

  def bounds(self) -> tuple[float, float]:
    """(min, max) of the path over t >= 0 (over t = 0..num_steps for a schedule)."""
    if self.kind != "schedule":
      return min(self.init_value, self.end_value), max(self.init_value, self.end_value)
    # Evaluated eagerly even when a controller is built inside jit (the steps are constants).
    with jax.ensure_compile_time_eval():
      values = np.asarray(self.fn(jnp.arange(self.num_steps + 1)), np.float64)
    if values.shape != (self.num_steps + 1,):
      raise ValueError(f"a target schedule must map a [T] array of steps to a [T] array, got "
                       f"shape {values.shape}.")
    if not np.all(np.isfinite(values)):
      raise ValueError("the target schedule is not finite on t = 0..num_steps.")
    return float(values.min()), float(values.max())


def _check_entropy_value(name: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number of nats, got {value!r}.")
  return float(value)


def constant_target(value: float) -> TargetPath:
  """H*(t) = value."""
  v = _check_entropy_value("value", value)
  return TargetPath("constant", v, v)


def linear_target(init_value: float, end_value: float, num_steps: int) -> TargetPath:
  """H*(t) moves linearly from init_value (t = 0) to end_value (t = num_steps), then stays."""
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}.")
  return TargetPath("linear", _check_entropy_value("init_value", init_value),
                    _check_entropy_value("end_value", end_value), num_steps=num_steps)


def exponential_target(init_value: float, end_value: float, half_life: float) -> TargetPath:
  """H*(t) = end_value + (init_value - end_value) 2^(-t / half_life): decays to end_value."""
  if not (isinstance(half_life, int | float) and math.isfinite(half_life) and half_life > 0):
    raise ValueError(f"half_life must be a finite number of steps > 0, got {half_life!r}.")
  return TargetPath("exponential", _check_entropy_value("init_value", init_value),
                    _check_entropy_value("end_value", end_value), half_life=float(half_life))


def schedule_target(fn: Callable[[jax.Array], jax.Array], num_steps: int) -> TargetPath:
  """Any callable `t -> H*` (vectorised over t), checked on t = 0..num_steps when built."""
  if not callable(fn):
    raise TypeError(f"fn must be callable (t -> target entropy), got {fn!r}.")
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
    raise ValueError(f"num_steps must be an int >= 0, got {num_steps!r}.")
  return TargetPath("schedule", float("nan"), float("nan"), num_steps=num_steps, fn=fn)


def as_target(target: Any, num_steps: int | None = None) -> TargetPath:
  """A TargetPath from a TargetPath, a number (constant) or a callable (needs num_steps)."""
  if isinstance(target, TargetPath):
    return target
  if isinstance(target, int | float) and not isinstance(target, bool):
    return constant_target(target)
  if callable(target):
    if num_steps is None:
      raise ValueError("a callable target needs num_steps (the steps on which to check it lies "
                       "in [0, log V]); or build it with schedule_target(fn, num_steps).")
    return schedule_target(target, num_steps)
  raise TypeError(f"target must be a TargetPath, a number or a callable, got {target!r}.")


def check_target(target: TargetPath, vocab_size: int) -> None:
  """Raise ValueError unless the path stays in [0, log vocab_size] (the possible entropies)."""
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
    raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}.")
  low, high = target.bounds()
  top = math.log(vocab_size)
  # A path may touch the bounds; a relative slack absorbs float32 round-off of log V itself.
  if low < 0 or high > top * (1 + 1e-6):
    raise ValueError(f"the target entropy path leaves [0, log V] = [0, {top:.6g}] nats "
                     f"(V = {vocab_size}): it ranges over [{low:.6g}, {high:.6g}].")


# --------------------------------------------------------------------------------- controllers


class ControllerState(NamedTuple):
  """State of an entropy controller (all scalars).

  Attributes:
    count: [] int32, updates chosen so far (t).
    coef: [] the strength chosen last (c_{t-1}); the initial coefficient before the first.
    level: [] the reactive rule's ungated level, or the PID's error integral; 0 otherwise.
    error: [] the last tracking error H*(t) - H_t (PID derivative, reactive with delay 1).
    target: [] H*(t) of the last update.
    predicted: [] predicted entropy change of the chosen strength (predictive; 0 otherwise).
    saturated: [] bool, the last coefficient was clipped to [c_min, c_max] or had no authority.
    nonfinite: [] bool, the last prediction was not finite: the previous coefficient was kept.
    num_nonfinite: [] int32, how many predictions were not finite so far.
  """

  count: jax.Array
  coef: jax.Array
  level: jax.Array
  error: jax.Array
  target: jax.Array
  predicted: jax.Array
  saturated: jax.Array
  nonfinite: jax.Array
  num_nonfinite: jax.Array


class Controller(NamedTuple):
  """An entropy controller: `init() -> state`, `update(state, entropy, predict=None)`.

  Attributes:
    init: () -> ControllerState.
    update: (state, entropy, predict=None) -> (coef, state). `entropy` is the measured (global)
      entropy H_t of the policy about to be updated; `predict(c)` the predicted (global) entropy
      change of the candidate update with strength c (needed by `predictive` only).
    name: "fixed", "reactive", "pid" or "predictive".
    coef_range: (c_min, c_max).
    vocab_size: V of the target check (None for `fixed`).
    needs_prediction: whether `update` uses `predict`.
  """

  init: Callable[[], ControllerState]
  update: Callable[..., tuple[jax.Array, ControllerState]]
  name: str
  coef_range: tuple[float, float]
  vocab_size: int | None
  needs_prediction: bool


def _check_range(coef_range: Any) -> tuple[float, float]:
  try:
    low, high = (float(v) for v in coef_range)
  except (TypeError, ValueError):
    raise ValueError(f"coef_range must be a pair (c_min, c_max), got {coef_range!r}.") from None
  if not (math.isfinite(low) and math.isfinite(high) and low < high):
    raise ValueError(f"coef_range needs finite c_min < c_max, got {coef_range!r}.")
  return low, high


def _check_init(init_coef: Any, low: float, high: float) -> float:
  c = _checks.concrete_float(init_coef)
  if c is None or not (low <= c <= high):
    raise ValueError(f"init_coef must be a number in coef_range [{low}, {high}], got "
                     f"{init_coef!r}.")
  return c


def _gain(name: str, value: Any, ok: Callable[[float], bool], rule: str) -> Any:
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


def _init_state(init_coef: float) -> Callable[[], ControllerState]:
  def init() -> ControllerState:
    zero = jnp.zeros((), jnp.float32)
    return ControllerState(
        count=jnp.zeros((), jnp.int32), coef=jnp.asarray(init_coef, jnp.float32), level=zero,
        error=zero, target=zero, predicted=zero, saturated=jnp.zeros((), bool),
        nonfinite=jnp.zeros((), bool), num_nonfinite=jnp.zeros((), jnp.int32))

  return init


_FLOAT_FIELDS = ("coef", "level", "error", "target", "predicted")


def _advance(state: ControllerState, coef: jax.Array, dtype, **changes) -> tuple[jax.Array,
                                                                                  ControllerState]:
  """(coef in the computation dtype, the next state with its fixed field dtypes)."""
  fixed = {k: jnp.asarray(v, jnp.float32 if k in _FLOAT_FIELDS else getattr(state, k).dtype)
           for k, v in changes.items()}
  new = state._replace(count=state.count + 1, coef=jnp.asarray(coef, jnp.float32), **fixed)
  return jnp.asarray(coef, dtype), new


def _measured(entropy: Any) -> jax.Array:
  h = _checks.check_float_array("entropy", entropy)
  if h.ndim != 0:
    raise ValueError(f"entropy must be a scalar (the pooled, global entropy), got shape "
                     f"{h.shape}.")
  return _checks.upcast(h)


def _tracking_error(path: TargetPath, state: ControllerState, entropy: Any
                    ) -> tuple[jax.Array, jax.Array]:
  """(H*(t), e_t = H*(t) - H_t), in the measured entropy's (upcast) dtype."""
  h = _measured(entropy)
  goal = path(state.count).astype(h.dtype)
  return goal, goal - h


def _target_path(target: Any, vocab_size: int, num_steps: int | None) -> TargetPath:
  path = as_target(target, num_steps)
  check_target(path, vocab_size)
  return path


def fixed(coef: float, *, coef_range: tuple[float, float] | None = None, target: Any = None,
          vocab_size: int | None = None, num_steps: int | None = None) -> Controller:
  """A constant strength c_t = coef (the open-loop baseline).

  Args:
    coef: the strength: a number, or a traced scalar (a sweep; then clipped to coef_range).
    coef_range: optional (c_min, c_max) the coefficient must lie in (for a common harness).
    target: optional H*(t), only recorded in `state.target` (for the tracking error); needs
      `vocab_size`.
    vocab_size: V, to check `target`.
    num_steps: horizon on which a callable target is checked.
  """
  c = _gain("coef", coef, lambda v: True, "a finite number")
  if isinstance(c, float):
    low, high = (_check_range(coef_range) if coef_range is not None
                 else (min(c, 0.0), max(c, 1.0)))
    _check_init(c, low, high)
  else:  # traced (a sweep): the range must be given, and the value is clipped into it
    if coef_range is None:
      raise ValueError("a traced coef needs coef_range.")
    low, high = _check_range(coef_range)
    c = jnp.clip(c, low, high)
  path = None
  if target is not None:
    if vocab_size is None:
      raise ValueError("a target needs vocab_size (to check it lies in [0, log V]).")
    path = _target_path(target, vocab_size, num_steps)
  init = _init_state(c)

  def update(state: ControllerState, entropy: jax.Array, predict: Predictor | None = None):
    del predict
    h = _measured(entropy)
    goal = path(state.count).astype(h.dtype) if path is not None else h
    return _advance(state, state.coef, h.dtype, error=goal - h, target=goal)

  return Controller(init, update, "fixed", (low, high), vocab_size, False)


def reactive(
    target: Any,
    *,
    vocab_size: int,
    delta: float,
    coef_range: tuple[float, float],
    init_coef: float = 0.0,
    delay: int = 0,
    num_steps: int | None = None,
) -> Controller:
  """Skywork-OR1's adaptive entropy control (the rule TRL's `use_adaptive_entropy` implements).

  With e_t the measured entropy and H*(t) the target:

    level_{t+1} = clip(level_t + delta if e_t < H*(t) else level_t - delta, c_min, c_max)
    c_t         = level_{t+1} * 1[e_t < H*(t)]

  level_0 = init_coef (Skywork-OR1's scripts start at 0). The released Skywork-OR1 code and TRL
  read e_t from the metrics of the update that just ran, so the coefficient of update t uses the
  entropy measured at update t - 1 (`delay=1`). covrl's loops know the current policy's entropy
  before the update, so the default `delay=0` uses it: one step fresher, which can only help
  the rule. Skywork-OR1 writes the target as a constant ("tgt-ent"); here it may be a path.
  Skywork-OR1 measures e_t as the mean of -log pi(y) over the sampled tokens and TRL as the mean
  full-vocabulary entropy over valid tokens; covrl passes the latter (THEORY.md's convention).

  Args:
    target: H*(t): a TargetPath, a number, or a callable (then `num_steps`).
    vocab_size: V; the path must lie in [0, log V].
    delta: the level's step per update, > 0 (Skywork-OR1: 1e-4 with c_max = 5e-3; TRL's
      default: 5e-3 with c_max = 1); a number or a traced scalar (a vmapped sweep).
    coef_range: (c_min, c_max) the level is clipped to.
    init_coef: level_0.
    delay: 0 (the current measurement) or 1 (the previous one, as the released code).
    num_steps: horizon on which a callable target is checked.

  Returns:
    A Controller.

  References:
    J. He et al., Skywork Open Reasoner 1 Technical Report, arXiv:2505.22312 (2025).
  """
  path = _target_path(target, vocab_size, num_steps)
  low, high = _check_range(coef_range)
  c0 = _check_init(init_coef, low, high)
  d = _gain("delta", delta, lambda v: v > 0, "a finite number > 0")
  if delay not in (0, 1):
    raise ValueError(f"delay must be 0 or 1, got {delay!r}.")
  base_init = _init_state(c0)

  def init() -> ControllerState:
    s = base_init()
    # With delay 1 the first update has no previous measurement: the gate starts open (the
    # released code initialises its flag entropy_loss_enabled to 1).
    return s._replace(level=jnp.asarray(c0, jnp.float32), error=jnp.ones((), jnp.float32))

  def update(state: ControllerState, entropy: jax.Array, predict: Predictor | None = None):
    del predict
    goal, error = _tracking_error(path, state, entropy)
    dt = error.dtype
    below = (state.error.astype(dt) if delay else error) > 0
    step = jnp.asarray(d, dt)
    if delay:
      # Released-code ordering: the level moved after the previous update, with its entropy.
      level = state.level.astype(dt)
      next_level = jnp.clip(level + jnp.where(error > 0, step, -step), low, high)
    else:
      level = jnp.clip(state.level.astype(dt) + jnp.where(below, step, -step), low, high)
      next_level = level
    coef = jnp.where(below, level, jnp.zeros((), dt))
    return _advance(state, coef, dt, level=next_level, error=error, target=goal,
                    saturated=(level <= low) | (level >= high), nonfinite=False)

  return Controller(init, update, "reactive", (low, high), vocab_size, False)


def pid_poles(kp: float, ki: float, kd: float, plant_gain: float) -> np.ndarray:
  """Closed-loop poles of the PID on the integrating plant H_{t+1} = H_t + b c_t + d.

  With e = H* - H, I_t = I_{t-1} + e_t and c_t = kp e_t + ki I_t + kd (e_t - e_{t-1}), a constant
  target and disturbance give e_{t+1} = e_t - b c_t, a linear system in (e_t, I_{t-1}, e_{t-1}):

    e_{t+1} = (1 - b (kp + ki + kd)) e_t - b ki I_{t-1} + b kd e_{t-1},
    I_t     = I_{t-1} + e_t.

  The loop is stable iff every eigenvalue has modulus < 1. States a gain does not use (I when
  ki = 0, e_{t-1} when kd = 0) are left out: they would only add a decoupled eigenvalue (1 or 0).
  A P controller has the single pole 1 - b kp: stable iff 0 < b kp < 2.
  """
  b = float(plant_gain)
  keep = [True, ki != 0, kd != 0]
  a = np.array([[1.0 - b * (kp + ki + kd), -b * ki, b * kd],
                [1.0, 1.0, 0.0],
                [1.0, 0.0, 0.0]])
  idx = [i for i, k in enumerate(keep) if k]
  return np.linalg.eigvals(a[np.ix_(idx, idx)])


def pid(
    target: Any,
    *,
    vocab_size: int,
    kp: float,
    ki: float = 0.0,
    kd: float = 0.0,
    coef_range: tuple[float, float],
    init_coef: float = 0.0,
    plant_gain: float | None = None,
    num_steps: int | None = None,
) -> Controller:
  """A PID controller on the measured entropy, with anti-windup.

  c_t = clip(c_0 + kp e_t + ki I_t + kd (e_t - e_{t-1}), c_min, c_max), e_t = H*(t) - H_t,
  I_t = I_{t-1} + e_t except while c_t saturates in the direction e_t pushes (conditional
  integration); e_{-1} = e_0 (no derivative kick at the start).

  Args:
    target: H*(t), as in `reactive`.
    vocab_size: V.
    kp, ki, kd: gains >= 0 (strength per nat of error), not all 0; numbers, or traced scalars
      (a vmapped sweep; checked only when concrete). They assume the strength raises entropy
      (true of the bonus, KL-Cov's beta and Clip-Cov's ratio).
    coef_range: (c_min, c_max).
    init_coef: c_0, the feed-forward strength.
    plant_gain: optional b = dH/dc per update, an estimate of how much one unit of strength
      raises the entropy in one update; when given, gains whose closed loop on the integrating
      plant H_{t+1} = H_t + b c_t + d is unstable (`pid_poles`) are rejected.
    num_steps: horizon on which a callable target is checked.
  """
  path = _target_path(target, vocab_size, num_steps)
  low, high = _check_range(coef_range)
  c0 = _check_init(init_coef, low, high)
  gains = {name: _gain(name, value, lambda v: v >= 0, "a finite number >= 0")
           for name, value in (("kp", kp), ("ki", ki), ("kd", kd))}
  concrete = all(isinstance(v, float) for v in gains.values())
  if concrete and not any(gains.values()):
    raise ValueError("a PID controller needs at least one positive gain.")
  if plant_gain is not None and concrete:
    b = _checks.concrete_float(plant_gain)
    if b is None or not (math.isfinite(b) and b > 0):
      raise ValueError(f"plant_gain must be a finite number > 0, got {plant_gain!r}.")
    radius = float(np.max(np.abs(pid_poles(gains["kp"], gains["ki"], gains["kd"], b))))
    if radius >= 1.0:
      raise ValueError(
          f"these PID gains make the loop unstable on a plant of gain {b:g} nats per unit "
          f"strength: largest closed-loop pole modulus {radius:.4g} >= 1 (reduce the gains).")
  init = _init_state(c0)
  kp_, ki_, kd_ = gains["kp"], gains["ki"], gains["kd"]

  def update(state: ControllerState, entropy: jax.Array, predict: Predictor | None = None):
    del predict
    goal, error = _tracking_error(path, state, entropy)
    dt = error.dtype
    previous = jnp.where(state.count == 0, error, state.error.astype(dt))
    integral = state.level.astype(dt) + error
    raw = (c0 + jnp.asarray(kp_, dt) * error + jnp.asarray(ki_, dt) * integral
           + jnp.asarray(kd_, dt) * (error - previous))
    winding = ((raw > high) & (error > 0)) | ((raw < low) & (error < 0))
    return _advance(state, jnp.clip(raw, low, high), dt,
                    level=jnp.where(winding, state.level.astype(dt), integral), error=error,
                    target=goal, saturated=(raw > high) | (raw < low), nonfinite=False)

  return Controller(init, update, "pid", (low, high), vocab_size, False)


def predictive(
    target: Any,
    *,
    vocab_size: int,
    coef_range: tuple[float, float],
    gain: float = 1.0,
    solver: Solver = "secant",
    num_iters: int = 12,
    num_points: int = 9,
    init_coef: float | None = None,
    num_steps: int | None = None,
) -> Controller:
  """The predictive controller: solve f(c_t) = H*(t+1) - H*(t) + gain (H*(t) - H_t) before update t.

  f(c) = `predict(c)`, the predicted entropy change of the candidate update with strength c
  (module docstring for how to build it and for the solvers).

  Args:
    target: H*(t): a TargetPath, a number, or a callable (then `num_steps`).
    vocab_size: V; the path must lie in [0, log V].
    coef_range: (c_min, c_max); the strength saturates there.
    gain: relaxation gain in (0, 2); 1 asks for the whole correction in one update (a number,
      or a traced scalar, checked only when concrete).
    solver: "secant", "bisection", "grid" or "newton".
    num_iters: bisection halvings (>= 0; 0 is the secant on the whole range).
    num_points: grid points, the ends included (>= 2; 2 is the secant on the whole range).
    init_coef: the strength "before the first update" (Newton's first expansion point and the
      fallback of a non-finite first prediction); c_min when None.
    num_steps: horizon on which a callable target is checked.

  Returns:
    A Controller with needs_prediction=True.

  Example:
    >>> import jax, jax.numpy as jnp, covrl
    >>> from covrl import controllers
    >>> z = jnp.array([2.0, 0.0, -1.0]); pg = jnp.array([0.3, -0.1, -0.2])
    >>> ctl = controllers.predictive(1.0, vocab_size=3, coef_range=(0.0, 5.0))
    >>> h = covrl.entropy(z)
    >>> predict = lambda c: covrl.entropy_change_first_order(z, pg + c * covrl.entropy_grad(z))
    >>> c, state = ctl.update(ctl.init(), h, predict)
    >>> bool(jnp.abs(h + predict(c) - 1.0) < 1e-5)
    True
  """
  path = _target_path(target, vocab_size, num_steps)
  low, high = _check_range(coef_range)
  c0 = low if init_coef is None else _check_init(init_coef, low, high)
  g = _gain("gain", gain, lambda v: 0.0 < v < 2.0,
            "in (0, 2): with an exact prediction the tracking error is multiplied by "
            "(1 - gain) each update, so a gain outside (0, 2) makes the loop unstable (or never "
            "corrects it)")
  if solver not in SOLVERS:
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
  if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 0:
    raise ValueError(f"num_iters must be an int >= 0, got {num_iters!r}.")
  if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
    raise ValueError(f"num_points must be an int >= 2, got {num_points!r}.")
  init = _init_state(c0)

  def update(state: ControllerState, entropy: jax.Array, predict: Predictor | None = None):
    if predict is None or not callable(predict):
      raise ValueError("the predictive controller needs predict(c) -> predicted entropy change.")
    h = _measured(entropy)
    t = state.count
    now, nxt = path(t).astype(h.dtype), path(t + 1).astype(h.dtype)
    desired = (nxt - now) + g * (now - h)
    coef, predicted, saturated = _solve(solver, num_iters, predict, desired, state.coef, low,
                                        high, h.dtype, num_points)
    finite = jnp.isfinite(coef) & jnp.isfinite(predicted)
    # The coefficient is returned in the computation's dtype; the state keeps float32 copies.
    coef = jnp.where(finite, coef, state.coef.astype(coef.dtype))
    return _advance(state, coef, h.dtype, error=now - h, target=now,
                    predicted=jnp.where(finite, predicted, 0.0), saturated=saturated & finite,
                    nonfinite=~finite,
                    num_nonfinite=state.num_nonfinite + (~finite).astype(jnp.int32))

  return Controller(init, update, "predictive", (low, high), vocab_size, True)


def switch(index: Any, branches: list[Controller] | tuple[Controller, ...]) -> Controller:
  """One controller that runs `branches[index]`, `index` a (possibly traced) int.

  All controllers share `ControllerState`, so a traced index selects one with `lax.switch`: a
  comparison of several controllers (and, with traced gains, of a grid of gains) is one
  compiled program, vmapped over the index. Under vmap every branch runs and its result is
  selected, so a predictive branch evaluates `predict` in every lane.

  Args:
    index: which branch, in [0, len(branches)).
    branches: controllers with the same coef_range.

  Returns:
    A Controller (needs_prediction if any branch needs it).
  """
  branches = tuple(branches)
  if not branches or not all(isinstance(b, Controller) for b in branches):
    raise TypeError("branches must be a non-empty sequence of Controllers.")
  ranges = {b.coef_range for b in branches}
  if len(ranges) != 1:
    raise ValueError(f"the branches must share one coef_range, got {sorted(ranges)}.")
  sizes = {b.vocab_size for b in branches} - {None}
  if len(sizes) > 1:
    raise ValueError(f"the branches were built for different vocab sizes {sorted(sizes)}.")
  i = jnp.asarray(index, jnp.int32)
  if _checks.is_concrete(i) and not 0 <= int(i) < len(branches):
    raise ValueError(f"index must lie in [0, {len(branches)}), got {int(i)}.")

  def init() -> ControllerState:
    return jax.lax.switch(i, [b.init for b in branches])

  def update(state, entropy, predict=None):
    return jax.lax.switch(i, [lambda s, h, b=b: b.update(s, h, predict) for b in branches],
                          state, entropy)

  return Controller(init, update, "switch", branches[0].coef_range,
                    next(iter(sizes), None), any(b.needs_prediction for b in branches))


def _scalar(predict: Predictor, c: jax.Array) -> jax.Array:
  out = jnp.asarray(predict(c))
  if out.ndim != 0:
    raise ValueError(f"predict(c) must return a scalar (the pooled predicted entropy change), "
                     f"got shape {out.shape}.")
  return out


def _line(c_a, f_a, c_b, f_b, desired, low, high):
  """Root of the line through (c_a, f_a), (c_b, f_b), clipped; (c, f(c) on the line, clipped?)."""
  slope = (f_b - f_a) / (c_b - c_a)
  flat = slope == 0
  root = c_a + (desired - f_a) / jnp.where(flat, 1.0, slope)
  # With no authority (a flat f) the root is undefined: stay at the nearer-predicting end.
  root = jnp.where(flat, jnp.where(jnp.abs(f_a - desired) <= jnp.abs(f_b - desired), c_a, c_b),
                   root)
  coef = jnp.clip(root, low, high)
  return coef, f_a + slope * (coef - c_a), flat | (root < low) | (root > high)


def _grid_solve(predict, desired, lo, hi, num_points, dtype):
  points = jnp.linspace(lo, hi, num_points).astype(dtype)
  f = jax.vmap(lambda c: _scalar(predict, c))(points).astype(dtype)
  g = jnp.sign(f - desired)
  changes = g[:-1] != g[1:]
  bracketed = jnp.any(changes)
  i = jnp.argmax(changes)
  coef, predicted, _ = _line(points[i], f[i], points[i + 1], f[i + 1], desired, points[i],
                             points[i + 1])
  # Without a sign change the target is out of reach: the nearest-predicting point.
  k = jnp.argmin(jnp.abs(f - desired))
  return (jnp.where(bracketed, coef, points[k]), jnp.where(bracketed, predicted, f[k]),
          ~bracketed)


def _solve(solver, num_iters, predict, desired, last, low, high, dtype, num_points=9):
  lo, hi = jnp.asarray(low, dtype), jnp.asarray(high, dtype)
  desired = desired.astype(dtype)
  if solver == "newton":
    start = jnp.clip(last.astype(dtype), lo, hi)
    f0, df = jax.jvp(lambda c: _scalar(predict, c).astype(dtype), (start,),
                     (jnp.ones((), dtype),))
    return _line(start, f0, start + 1.0, f0 + df, desired, lo, hi)
  if solver == "grid":
    return _grid_solve(predict, desired, lo, hi, num_points, dtype)
  ends = jnp.stack([lo, hi])
  f_ends = jax.vmap(lambda c: _scalar(predict, c))(ends).astype(dtype)
  if solver == "secant" or num_iters == 0:
    return _line(lo, f_ends[0], hi, f_ends[1], desired, lo, hi)
  g_lo, g_hi = f_ends[0] - desired, f_ends[1] - desired
  bracketed = jnp.sign(g_lo) != jnp.sign(g_hi)

  def halve(_, carry):
    a, fa, b, fb = carry
    m = 0.5 * (a + b)
    fm = _scalar(predict, m).astype(dtype)
    same = jnp.sign(fm - desired) == jnp.sign(fa - desired)
    return (jnp.where(same, m, a), jnp.where(same, fm, fa), jnp.where(same, b, m),
            jnp.where(same, fb, fm))

  a, fa, b, fb = jax.lax.fori_loop(0, num_iters, halve, (lo, f_ends[0], hi, f_ends[1]))
  coef, predicted, _ = _line(a, fa, b, fb, desired, a, b)
  # Without a sign change the target is out of reach: saturate at the nearer-predicting end.
  nearer_lo = jnp.abs(g_lo) <= jnp.abs(g_hi)
  coef = jnp.where(bracketed, coef, jnp.where(nearer_lo, lo, hi))
  predicted = jnp.where(bracketed, predicted, jnp.where(nearer_lo, f_ends[0], f_ends[1]))
  return coef, predicted, ~bracketed


# ------------------------------------------------------------------------ as an optax transform


class ControlledBonusState(NamedTuple):
  """State of `controlled_entropy_bonus`: the controller's and the wrapped optimiser's."""

  controller: ControllerState
  inner: Any


def controlled_entropy_bonus(
    controller: Controller,
    optimizer: optax.GradientTransformation,
    *,
    order: int = 1,
    temperature: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
  """A closed-loop entropy bonus for a logit-parameterised policy, wrapping an optax optimiser.

  `params` are the logits z ([K], or [S, K] for S states) and `updates` the gradient g of the
  policy loss. With H_w(z) = sum_s w_s H(softmax(z_s / temperature)) / sum_s w_s, the bonus
  loss -c H_w has gradient -c grad H_w, so the candidate logit update is

    dz(c) = optimizer.update(g - c grad H_w(z), inner_state, z),

  and the controller picks c from the measured H_w(z) and predict(c) = the pooled change of
  dz(c) (first or second order). The transform returns dz(c_t); `state.controller.coef` holds
  c_t. With `optax.sgd`, dz(c) is affine in c and the default secant solver hits the predicted
  target exactly; with an adaptive optimiser (Adam) use `solver="bisection"`. Adam's very first
  step is -lr sign(g - c grad H) (its moments are that one gradient), piecewise constant in c,
  so only the jumps between sign patterns can be chosen there; later steps are smooth in c.

  Args:
    controller: a controller from this module (vocab_size = K).
    optimizer: the optax optimiser that turns gradients into logit updates.
    order: the predictor's order, 1 or 2.
    temperature: softmax temperature > 0 of the entropy.

  Returns:
    An optax GradientTransformationExtraArgs; `update(updates, state, params, *, weights=None,
    **extra)`, `weights` [S] >= 0 (uniform when None), other extra args go to `optimizer`.

  Example:
    >>> import jax.numpy as jnp, optax, covrl
    >>> from covrl import controllers
    >>> ctl = controllers.predictive(0.5, vocab_size=4, coef_range=(0.0, 5.0))
    >>> opt = controllers.controlled_entropy_bonus(ctl, optax.sgd(1.0))
    >>> z = jnp.array([3.0, 0.0, -1.0, -2.0]); state = opt.init(z)  # H(z) = 0.31
    >>> dz, state = opt.update(jnp.array([-0.2, 0.1, 0.05, 0.05]), state, z)
    >>> round(float(covrl.entropy(z) + state.controller.predicted), 4)  # predicted: on target
    0.5
    >>> round(float(covrl.entropy(z + dz)), 2)  # actual: + the O(dz^2) remainder of a big step
    0.54
  """
  if not isinstance(controller, Controller):
    raise TypeError(f"controller must be a covrl.controllers.Controller, got "
                    f"{type(controller).__name__}.")
  if order not in (1, 2):
    raise ValueError(f"order must be 1 or 2, got {order!r}.")
  _checks.check_positive("temperature", temperature)
  inner_opt = optax.with_extra_args_support(optimizer)

  def init_fn(params) -> ControlledBonusState:
    return ControlledBonusState(controller.init(), inner_opt.init(params))

  def update_fn(updates, state, params=None, *, weights=None, **extra):
    if params is None:
      raise ValueError("controlled_entropy_bonus needs params (the logits) in update().")
    z = ent.check_logits(params)
    if z.ndim not in (1, 2):
      raise ValueError(f"params must be logits [K] or [S, K], got shape {z.shape}.")
    if controller.vocab_size is not None and controller.vocab_size != z.shape[-1]:
      raise ValueError(f"the controller was built for vocab_size={controller.vocab_size}, the "
                       f"logits have {z.shape[-1]} entries.")
    g = jnp.asarray(updates)
    tempered = lambda x: x / temperature
    h = ep.pooled_entropy(tempered(z), weights)
    grad_h = jax.grad(lambda x: ep.pooled_entropy(tempered(x), weights))(z)

    def candidate(c):
      step, inner = inner_opt.update((g - c * grad_h).astype(g.dtype), state.inner, params,
                                     **extra)
      return step, inner

    def predict(c):
      dz = candidate(jnp.asarray(c, z.dtype))[0]
      return ep.pooled_entropy_change(tempered(z), tempered(jnp.asarray(dz, z.dtype)), weights,
                                      order=order)

    coef, cstate = controller.update(state.controller, h,
                                     predict if controller.needs_prediction else None)
    step, inner = candidate(coef.astype(z.dtype))
    if not controller.needs_prediction:
      cstate = cstate._replace(predicted=ep.pooled_entropy_change(
          tempered(z), tempered(jnp.asarray(step, z.dtype)), weights, order=order))
    return step, ControlledBonusState(cstate, inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

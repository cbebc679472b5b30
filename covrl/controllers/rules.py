"""The baseline controllers, which do not predict: fixed, reactive (Skywork-OR1's rule) and PID.

References:
  J. He et al., Skywork Open Reasoner 1 Technical Report, arXiv:2505.22312 (2025), Sec. 3.2
  ("adaptive entropy control"); github.com/SkyworkAI/Skywork-OR1 (verl/trainer/ppo/core_algos.py).
  K. J. Astrom, R. M. Murray, Feedback Systems, Princeton University Press (2008), Ch. 10 (PID,
  integrator windup).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from covrl import _checks
from covrl.controllers import base
from covrl.controllers.base import Controller, Predictor

FixedState = base.state_type("FixedState", "State of `fixed`: only the report fields.",
                              module=__name__)
ReactiveState = base.state_type(
    "ReactiveState", "State of `reactive`: the report fields and the ungated level.", "level",
    module=__name__)
PIDState = base.state_type(
    "PIDState", "State of `pid`: the report fields and the integral of the tracking error.",
    "integral", module=__name__)


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
  c = base.gain("coef", coef, lambda v: True, "a finite number")
  if isinstance(c, float):
    low, high = (base.check_range(coef_range) if coef_range is not None
                 else (min(c, 0.0), max(c, 1.0)))
    base.check_init(c, low, high)
  else:  # traced (a sweep): the range must be given, and the value is clipped into it
    if coef_range is None:
      raise ValueError("a traced coef needs coef_range.")
    low, high = base.check_range(coef_range)
    c = jnp.clip(c, low, high)
  path = None
  if target is not None:
    if vocab_size is None:
      raise ValueError("a target needs vocab_size (to check it lies in [0, log V]).")
    path = base.target_path(target, vocab_size, num_steps)

  def init() -> FixedState:
    return base.report_init(FixedState, c)

  def update(state: FixedState, entropy: jax.Array, predict: Predictor | None = None):
    del predict
    h = base.measured(entropy)
    goal = path(state.count).astype(h.dtype) if path is not None else h
    return base.advance(state, state.coef, h.dtype, error=goal - h, target=goal,
                        nonfinite=False)

  return Controller(init, base.guarded(update), "fixed", (low, high), vocab_size, False)


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
    target: H*(t): a number or a callable (covrl.controllers.targets).
    vocab_size: V; the path must lie in [0, log V].
    delta: the level's step per update, > 0 (Skywork-OR1: 1e-4 with c_max = 5e-3; TRL's
      default: 5e-3 with c_max = 1); a number or a traced scalar (a vmapped sweep).
    coef_range: (c_min, c_max) the level is clipped to.
    init_coef: level_0.
    delay: 0 (the current measurement) or 1 (the previous one, as the released code).
    num_steps: horizon on which a callable target is checked.

  Returns:
    A Controller.
  """
  path = base.target_path(target, vocab_size, num_steps)
  low, high = base.check_range(coef_range)
  c0 = base.check_init(init_coef, low, high)
  d = base.gain("delta", delta, lambda v: v > 0, "a finite number > 0")
  if delay not in (0, 1):
    raise ValueError(f"delay must be 0 or 1, got {delay!r}.")

  def init() -> ReactiveState:
    # With delay 1 the first update has no previous measurement: the gate starts open (the
    # released code initialises its flag entropy_loss_enabled to 1).
    return base.report_init(ReactiveState, c0, level=jnp.asarray(c0, jnp.float32),
                            error=jnp.ones((), jnp.float32))

  def update(state: ReactiveState, entropy: jax.Array, predict: Predictor | None = None):
    del predict
    goal, error = base.tracking_error(path, state.count, entropy)
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
    return base.advance(state, coef, dt, level=next_level, error=error, target=goal,
                        saturated=(level <= low) | (level >= high), nonfinite=False)

  return Controller(init, base.guarded(update), "reactive", (low, high), vocab_size, False)


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
  path = base.target_path(target, vocab_size, num_steps)
  low, high = base.check_range(coef_range)
  c0 = base.check_init(init_coef, low, high)
  gains = {name: base.gain(name, value, lambda v: v >= 0, "a finite number >= 0")
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
  kp_, ki_, kd_ = gains["kp"], gains["ki"], gains["kd"]

  def init() -> PIDState:
    return base.report_init(PIDState, c0, integral=jnp.zeros((), jnp.float32))

  def update(state: PIDState, entropy: jax.Array, predict: Predictor | None = None):
    del predict
    goal, error = base.tracking_error(path, state.count, entropy)
    dt = error.dtype
    previous = jnp.where(state.count == 0, error, state.error.astype(dt))
    integral = state.integral.astype(dt) + error
    raw = (c0 + jnp.asarray(kp_, dt) * error + jnp.asarray(ki_, dt) * integral
           + jnp.asarray(kd_, dt) * (error - previous))
    winding = ((raw > high) & (error > 0)) | ((raw < low) & (error < 0))
    return base.advance(state, jnp.clip(raw, low, high), dt,
                        integral=jnp.where(winding, state.integral.astype(dt), integral),
                        error=error, target=goal, saturated=(raw > high) | (raw < low),
                        nonfinite=False)

  return Controller(init, base.guarded(update), "pid", (low, high), vocab_size, False)

"""The predictive controller: it solves for the strength whose predicted entropy change puts the
entropy on its target path, before the update.

Given f(c), the predicted entropy change of the candidate update with strength c (THEORY.md T1:
first or second order, per context and pooled), it solves

  f(c_t) = H*(t+1) - H*(t) + gain * (H*(t) - H_t)                                          (1)

for c_t in [c_min, c_max]. With an exact prediction the error e_t = H_t - H*(t) obeys
e_{t+1} = (1 - gain) e_t: stable iff 0 < gain < 2 (checked when built), deadbeat at gain = 1.

f is evaluated through the caller's `predict`, so the controller does not care how the
candidate logit update dz(c) was obtained (exactly, for a logit-parameterised policy; as
J dtheta(c) by `jax.jvp` for a network, see `covrl.linearized_logit_update`). Solvers:

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
`state.num_nonfinite`); nothing becomes NaN.

References:
  G. Cui et al., The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models,
  arXiv:2505.22617 (2025), Lemma 1 (the covariance predictor).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from covrl import _checks
from covrl.controllers import base
from covrl.controllers.base import Controller, Predictor

Solver = Literal["secant", "bisection", "grid", "newton"]
#: The solvers of `predictive`.
SOLVERS: tuple[str, ...] = ("secant", "bisection", "grid", "newton")


PredictiveState = base.state_type(
    "PredictiveState", "State of `predictive`: the report fields and the number of non-finite "
    "predictions so far.", "num_nonfinite", module=__name__)


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
    target: H*(t): a number or a callable (covrl.controllers.targets).
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
  path = base.target_path(target, vocab_size, num_steps)
  low, high = base.check_range(coef_range)
  c0 = low if init_coef is None else base.check_init(init_coef, low, high)
  g = base.gain("gain", gain, lambda v: 0.0 < v < 2.0,
            "in (0, 2): with an exact prediction the tracking error is multiplied by "
            "(1 - gain) each update, so a gain outside (0, 2) makes the loop unstable (or never "
            "corrects it)")
  if solver not in SOLVERS:
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
  _checks.check_int("num_iters", num_iters, 0)
  _checks.check_int("num_points", num_points, 2)

  def init() -> PredictiveState:
    return base.report_init(PredictiveState, c0, num_nonfinite=jnp.zeros((), jnp.int32))

  def update(state: PredictiveState, entropy: jax.Array, predict: Predictor | None = None):
    if predict is None or not callable(predict):
      raise ValueError("the predictive controller needs predict(c) -> predicted entropy change.")
    h = base.measured(entropy)
    t = state.count
    now, nxt = path(t).astype(h.dtype), path(t + 1).astype(h.dtype)
    desired = (nxt - now) + g * (now - h)
    coef, predicted, saturated = _solve(solver, num_iters, predict, desired, state.coef, low,
                                        high, h.dtype, num_points)
    finite = jnp.isfinite(coef) & jnp.isfinite(predicted)
    # The coefficient is returned in the computation's dtype; the state keeps float32 copies.
    coef = jnp.where(finite, coef, state.coef.astype(coef.dtype))
    return base.advance(state, coef, h.dtype, error=now - h, target=now,
                    predicted=jnp.where(finite, predicted, 0.0), saturated=saturated & finite,
                    nonfinite=~finite,
                    num_nonfinite=state.num_nonfinite + (~finite).astype(jnp.int32))

  return Controller(init, base.guarded(update), "predictive", (low, high), vocab_size, True)


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

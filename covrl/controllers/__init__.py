"""Closed-loop entropy control: choose a control's strength so that entropy follows a target path.

A control method has a strength c (`covrl.Control.strength`): the entropy-bonus coefficient
alpha, KL-Cov's beta, or Clip-Cov's token ratio r. Before update t a controller sets c_t from
what is known at that time, so that the entropy H_t of the policy (before update t) follows a
target path H*(t) (`targets`: any callable t -> H*, or a number)::

  fixed(c)      c_t = c.
  reactive      the adaptive entropy control of Skywork-OR1 (He et al. 2025, Sec. 3.2), which TRL
                adopted (GRPOConfig.use_adaptive_entropy): a level moves by a fixed step toward
                the target and is applied only while entropy is below it,
                  level_{t+1} = clip(level_t + delta * (+1 if H_t < H*(t) else -1), c_min, c_max),
                  c_t = level_{t+1} * 1[H_t < H*(t)].
  pid           c_t = clip(c_0 + kp e_t + ki sum_{s<=t} e_s + kd (e_t - e_{t-1})),
                e_t = H*(t) - H_t, the integral frozen while the output saturates in the
                direction of e_t (anti-windup).
  predictive    uses the covariance predictor of THEORY.md T1 *before* the update: it solves
                f(c_t) = H*(t+1) - H*(t) + gain (H*(t) - H_t), f(c) the predicted entropy change
                of the candidate update with strength c (`covrl.controllers.predictive`).
  switch        one of several, chosen by a traced index (a comparison in one program).

Every controller is a pair of pure functions with an explicit state of its own type (optax
style): `state = controller.init()`, then before each update
`coef, state = controller.update(state, entropy, predict)`; both work under jit, vmap and scan.
`entropy` is the measured entropy of the current policy and `predict(c)` the predicted change;
on many devices both must be global statistics: build them with `covrl.pooled_entropy` and
`covrl.pooled_entropy_change` (pass `axis_name` inside `shard_map`; under plain jit on globally
sharded arrays the sums are global already). The controller is scalar arithmetic.
`controlled_entropy_bonus` wraps a controller and any optax optimiser into one gradient
transformation for a logit-parameterised policy.
"""

from covrl.controllers.base import REPORT_FIELDS, Controller
from covrl.controllers.bonus import ControlledBonusState, controlled_entropy_bonus
from covrl.controllers.predictive import SOLVERS, PredictiveState, predictive
from covrl.controllers.rules import (
    FixedState,
    PIDState,
    ReactiveState,
    fixed,
    pid,
    pid_poles,
    reactive,
)
from covrl.controllers.switch import SwitchState, switch
from covrl.controllers.targets import (
    ConstantTarget,
    ExponentialTarget,
    LinearTarget,
    as_target,
    check_target,
    constant_target,
    exponential_target,
    linear_target,
    target_bounds,
)

__all__ = [
    "ConstantTarget",
    "ControlledBonusState",
    "Controller",
    "ExponentialTarget",
    "FixedState",
    "LinearTarget",
    "PIDState",
    "PredictiveState",
    "REPORT_FIELDS",
    "ReactiveState",
    "SOLVERS",
    "SwitchState",
    "as_target",
    "check_target",
    "constant_target",
    "controlled_entropy_bonus",
    "exponential_target",
    "fixed",
    "linear_target",
    "pid",
    "pid_poles",
    "predictive",
    "reactive",
    "switch",
    "target_bounds",
]

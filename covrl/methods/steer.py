"""STEER (Hao et al. 2025): tokens weighted down by the size of their predicted entropy change.

Each token's loss is multiplied by a detached weight lambda_i in [w_min, 1] that falls with
|Omega_i|, the first-order entropy change (THEORY.md T1.2) that the token's own update makes at
its position:

  Omega_i = -c_i pi_i (1 - pi_i) (log pi_i + H_i),   c_i = -d loss_i / d log pi(y_i),

with pi_i = pi(y_i) the token's probability, H_i its position's entropy and c_i the slope of the
token's PPO loss (A_i r_i where the clip does not bind, 0 where it does). It is -Cov_pi(log pi,
dz) for dz = c_i (1 - pi_i) e_{y_i}, the sampled logit's entry of the token's own logit gradient
c_i (e_{y_i} - pi) (T1.1: dH/dz_y = -pi_y (log pi_y + H)); the other entries, -c_i pi_a for
a != y_i, would add c_i sum_{a != y} pi_a^2 (log pi_a + H), which needs the whole distribution
and which STEER's estimator, like this one, leaves out. It reads what the reference reads
(advantage, probabilities, entropy), so it works at vocabulary scale from `entropy=` alone.

Weights (the reference code's two mappings, scale over the valid tokens of the call, global over
devices with `axis_name`):

  "exp"     lambda_i = exp(-alpha |Omega_i| / max(max_j |Omega_j|, omega_floor)),
            alpha = -log(token_weight_min): the paper's form (run_exp.sh: w_min 0.8);
  "linear"  lambda_i = w_max - (|Omega_i| - min|Omega|) (w_max - w_min) / (max - min).

Difference from the released code (core_algos.compute_token_weights): it ranks tokens by
|A / pi_old pi (1 - pi) (log pi + H)|, which is covrl's |Omega_i| / pi_i (it has no factor pi_i
from dH/dz_y, and ignores the clip); covrl uses the first-order change itself.

References:
  Z. Hao et al., Rethinking Entropy Interventions in RLVR: An Entropy Change Perspective,
  arXiv:2510.10150 (2025); github.com/zz-haooo/STEER (verl/trainer/ppo/core_algos.py).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
from jax import lax

from covrl import _checks
from covrl import schedules as sch
from covrl.methods.base import Control, PPOClip, register
from covrl.tokens import PolicyTokens, Surrogate, ratio


@register("steer", static=("mapping",))
class STEER(Control, PPOClip):
  """STEER: PPO's token loss times a detached weight that falls with the predicted entropy change.

  See the module docstring for Omega_i and the two mappings. The weight never exceeds 1 in the
  "exp" mapping, so STEER only damps the tokens whose update moves entropy most (in either
  direction). There is no verl or TRL keyword: the names are the reference code's
  (token_weight_min, token_weight_max, linear -> `mapping`) and the defaults its run_exp.sh's
  (the paper's exponential form, w_min = 0.8); the PPO fields are verl's.

  Attributes:
    token_weight_min: w_min in (0, 1], the smallest weight; the strength (1: off).
    token_weight_max: w_max >= w_min, the largest weight of the "linear" mapping.
    mapping: "exp" or "linear".
    omega_floor: floor on the scale `max |Omega|` of the "exp" mapping (reference: 0.02), > 0.
    clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c: the PPO loss, as `NoControl`.
  """

  token_weight_min: Any = 0.8
  token_weight_max: Any = 1.0
  mapping: Literal["exp", "linear"] = "exp"
  omega_floor: Any = 0.02
  clip_ratio: Any = 0.2
  clip_ratio_low: Any = None
  clip_ratio_high: Any = None
  clip_ratio_c: Any = 3.0

  strength: ClassVar[str] = "token_weight_min"
  ranges: ClassVar[dict[str, sch.Range]] = {"token_weight_min": sch.Range(0.0, 1.0, low_open=True)}
  reweights_tokens: ClassVar[bool] = True
  needs_entropy: ClassVar[bool] = True

  def __post_init__(self):
    if self.mapping not in ("exp", "linear"):
      raise ValueError(f"mapping must be 'exp' or 'linear', got {self.mapping!r}.")
    low = None if callable(self.token_weight_min) else _checks.concrete_float(
        self.token_weight_min)
    if low is not None and not (0.0 < low <= 1.0):
      raise ValueError(f"token_weight_min must lie in (0, 1], got {low!r}.")
    high = _checks.concrete_float(self.token_weight_max)
    if low is not None and high is not None and not (math.isfinite(high) and high >= low):
      raise ValueError(f"token_weight_max must be finite and >= token_weight_min, got "
                       f"{high!r} < {low!r}.")
    _checks.check_positive("omega_floor", self.omega_floor)
    self._check_clip()

  def predicted_change(self, tokens: PolicyTokens, surrogate: Surrogate) -> jax.Array:
    """[B, T] Omega_i, the first-order entropy change of each token's own update (detached)."""
    r = ratio(tokens)
    slope = tokens.advantages * r
    for clipped in (surrogate.clipped, surrogate.clipped_lower):
      if clipped is not None:
        slope = jnp.where(clipped, 0.0, slope)
    p = jnp.exp(tokens.log_prob)
    omega = -slope * p * (1.0 - p) * (tokens.log_prob + tokens.entropy)
    return lax.stop_gradient(jnp.where(tokens.valid, omega, 0.0))

  def weights(self, tokens: PolicyTokens, surrogate: Surrogate, *, step: Any = None,
              axis_name: str | None = None) -> jax.Array:
    """[B, T] the detached weights lambda_i (1 at unused tokens)."""
    size = jnp.abs(self.predicted_change(tokens, surrogate))
    w_min = jnp.asarray(self.strength_at(step), size.dtype)
    top = jnp.max(jnp.where(tokens.valid, size, 0.0), initial=0.0)  # initial: B or T = 0
    if self.mapping == "exp":
      if axis_name is not None:
        top = lax.pmax(top, axis_name)
      scale = jnp.maximum(top, self.omega_floor)
      w = jnp.clip(jnp.exp(jnp.log(w_min) * size / scale), w_min, 1.0)
    else:
      w_max = jnp.asarray(self.token_weight_max, size.dtype)
      bottom = jnp.min(jnp.where(tokens.valid, size, jnp.inf), initial=jnp.inf)
      if axis_name is not None:
        top, bottom = lax.pmax(top, axis_name), lax.pmin(bottom, axis_name)
      spread = top - bottom
      w = jnp.where(spread > 0, w_max - (size - bottom) * (w_max - w_min) /
                    jnp.where(spread > 0, spread, 1.0), 0.5 * (w_min + w_max))
      w = jnp.clip(w, w_min, w_max)
    return lax.stop_gradient(jnp.where(tokens.valid, w, 1.0))

  def surrogate(self, tokens):
    return self._ppo_surrogate(tokens, dual=True)

  def loss_change(self, tokens, surrogate, selection, *, step=None, axis_name=None):
    w = self.weights(tokens, surrogate, step=step, axis_name=axis_name)
    return jnp.where(tokens.valid, (w - 1.0) * surrogate.loss, 0.0)

  def touched(self, tokens, surrogate, selection):
    # Every token whose weight is below 1 (the step is unknown here: a schedule's first value).
    w = self.weights(tokens, surrogate, step=0 if callable(self.token_weight_min) else None)
    return tokens.valid & (w != 1.0)

  def check_call(self, *, key, step, has_logits, has_selected, has_weights=False):
    del has_weights, key, has_logits, has_selected
    if callable(self.token_weight_min) and step is None:
      raise ValueError("token_weight_min is a schedule: pass the optimisation step as `step=`.")

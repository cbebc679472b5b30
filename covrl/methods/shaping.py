"""Advantage shaping and sample reweighting: controls that change the advantage a token carries.

  EntropyAdvantage  A + min(alpha H, |A| / kappa), H the token's detached entropy (Cheng et al.).
  WReinforce        A scaled by lambda where A > 0 (Zhu et al.'s W-REINFORCE).

Both keep the gradient a multiple of each token's score grad log pi(y_i) (the weights are
detached), so every sampled token's logit update keeps the direction of PPO's and only its size
changes (THEORY.md T5.4). Each is expressed as a change of PPO's token loss (`loss_change`), so
`covrl.policy_loss` and `covrl.transform` apply it alike.

References:
  D. Cheng et al., Reasoning with Exploration: An Entropy Perspective, arXiv:2506.14758 (2025).
  X. Zhu et al., The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning,
  arXiv:2506.01347 (2025); github.com/TianHongZXY/RLVR-Decomposed.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax.numpy as jnp
from jax import lax

from covrl import _checks
from covrl.methods.base import Control, PPOClip, check_coefficient, register


@register("entropy_advantage")
class EntropyAdvantage(Control, PPOClip):
  """Entropy-based advantage shaping: `A_shaped = A + min(alpha H_detached, |A| / kappa)`.

  H is the full-vocabulary entropy of the current policy at the token's position (the loss's
  `logits=` or `entropy=`), detached, so the term only rescales each token's policy-gradient
  weight: the gradient keeps the form (A + psi) grad log pi. The clip `|A| / kappa` (kappa > 1)
  keeps psi below `|A| / kappa`, so a negative advantage stays negative and A = 0 stays 0. The
  shaped advantage goes through PPO's clipped surrogate with the usual fields; the change of the
  token loss is surrogate(A_shaped) - surrogate(A). There is no verl or TRL keyword: the
  defaults are the paper's (kappa = 2 throughout; alpha = 0.4 with GRPO, 0.1 with PPO:
  `paper_ppo()`).

  Attributes:
    alpha: the scale of the entropy term, >= 0 (or a schedule); the strength.
    kappa: the clip, > 1 (paper: 2).
    clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c: the PPO loss, as `NoControl`.
  """

  alpha: Any = 0.4
  kappa: Any = 2.0
  clip_ratio: Any = 0.2
  clip_ratio_low: Any = None
  clip_ratio_high: Any = None
  clip_ratio_c: Any = 3.0

  strength: ClassVar[str] = "alpha"
  coefficient_field: ClassVar[str] = "alpha"
  reweights_tokens: ClassVar[bool] = True
  needs_entropy: ClassVar[bool] = True

  def __post_init__(self):
    check_coefficient("alpha", self.alpha)
    k = _checks.concrete_float(self.kappa)
    if k is not None and not k > 1.0:
      raise ValueError(f"kappa must be > 1 (the bonus stays below |A| / kappa), got {k!r}.")
    self._check_clip()

  @classmethod
  def paper_ppo(cls) -> EntropyAdvantage:
    """Cheng et al.'s PPO setting: alpha = 0.1, kappa = 2."""
    return cls(alpha=0.1, kappa=2.0)

  def bonus(self, tokens, step=None) -> Any:
    """[B, T] `psi = min(alpha H, |A| / kappa)` at the used tokens (0 elsewhere), detached."""
    alpha = self.strength_at(step)
    psi = jnp.minimum(alpha * tokens.entropy, jnp.abs(tokens.advantages) / self.kappa)
    return lax.stop_gradient(jnp.where(tokens.valid, psi, 0.0))

  def surrogate(self, tokens):
    return self._ppo_surrogate(tokens, dual=True)

  def loss_change(self, tokens, surrogate, selection, *, step=None, axis_name=None):
    shaped = tokens._replace(advantages=tokens.advantages + self.bonus(tokens, step))
    return jnp.where(tokens.valid, self._ppo_surrogate(shaped, dual=True).loss - surrogate.loss,
                     0.0)

  def touched(self, tokens, surrogate, selection):
    if callable(self.alpha):  # no step here: the tokens a positive alpha would shape
      return tokens.valid & (tokens.advantages != 0) & (tokens.entropy > 0)
    return tokens.valid & (self.bonus(tokens) > 0)

  def check_call(self, *, key, step, has_logits, has_selected, has_weights=False):
    del has_weights, key, has_logits, has_selected
    if callable(self.alpha) and step is None:
      raise ValueError("alpha is a schedule: pass the optimisation step as `step=`.")


@register("w_reinforce")
class WReinforce(Control, PPOClip):
  """Positive / negative sample reweighting (W-REINFORCE): positive advantages scaled by lambda.

  The token loss of every token with A > 0 is multiplied by lambda (PPO's clipped loss is
  positively homogeneous in A, so this is the loss of lambda A); tokens with A <= 0 are
  unchanged. With the paper's advantages, the rewards themselves (+1 correct, -1 incorrect; no
  baseline, REINFORCE), this is W-REINFORCE exactly: advantages +lambda and -1, the objective
  lambda L_PSR + L_NSR. With other advantages (GRPO's, a value baseline) it is the same
  down-weighting of positive samples. There is no verl or TRL keyword: the name is the
  reference code's, `positive_advantage_weight`, and the default lambda = 0.1 the paper's.

  Attributes:
    positive_advantage_weight: lambda >= 0 (paper: 0.1; 1 is the plain loss); the strength.
    clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c: the PPO loss, as `NoControl`.
  """

  positive_advantage_weight: Any = 0.1
  clip_ratio: Any = 0.2
  clip_ratio_low: Any = None
  clip_ratio_high: Any = None
  clip_ratio_c: Any = 3.0

  strength: ClassVar[str] = "positive_advantage_weight"
  reweights_tokens: ClassVar[bool] = True

  def __post_init__(self):
    if not callable(self.positive_advantage_weight):
      _checks.check_nonnegative("positive_advantage_weight", self.positive_advantage_weight)
    self._check_clip()

  def surrogate(self, tokens):
    return self._ppo_surrogate(tokens, dual=True)

  def loss_change(self, tokens, surrogate, selection, *, step=None, axis_name=None):
    lam = self.strength_at(step)
    return jnp.where(tokens.valid & (tokens.advantages > 0), (lam - 1.0) * surrogate.loss, 0.0)

  def touched(self, tokens, surrogate, selection):
    lam = _checks.concrete_float(self.positive_advantage_weight)
    positive = tokens.valid & (tokens.advantages > 0)
    return positive & (lam != 1.0) if lam is not None else positive

  def check_call(self, *, key, step, has_logits, has_selected, has_weights=False):
    del has_weights, key, has_logits, has_selected
    if callable(self.positive_advantage_weight) and step is None:
      raise ValueError("positive_advantage_weight is a schedule: pass the optimisation step as "
                       "`step=`.")

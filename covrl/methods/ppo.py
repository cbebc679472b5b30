"""The PPO family: no control, the entropy bonus and clip-higher.

References:
  Schulman et al., Proximal Policy Optimization Algorithms, arXiv:1707.06347 (2017).
  Ye et al., Mastering Complex Control in MOBA Games with Deep RL (dual clip), arXiv:1912.09729.
  Yu et al., DAPO (clip-higher), arXiv:2503.14476 (2025).
"""

from __future__ import annotations

from typing import Any, ClassVar

from jax import lax

from covrl import _checks
from covrl.methods.base import Control, PPOClip, check_coefficient, register
from covrl.tokens import ratio


@register("none")
class NoControl(Control, PPOClip):
  """No entropy control: PPO's clipped surrogate with the dual clip (verl's "vanilla" loss).

  Per token, with r = pi / pi_old (log-ratio clamped to [-20, 20]):
    l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high));  for A < 0, l = min(l, -A c).

  Attributes:
    clip_ratio: eps for both sides unless overridden (verl: 0.2); None gives the unclipped
      policy gradient -A r (its gradient on-policy is REINFORCE's, -A grad log pi).
    clip_ratio_low, clip_ratio_high: eps_low and eps_high (None: clip_ratio).
    clip_ratio_c: dual-clip bound c > 1 (verl: 3.0); None disables the dual clip.
  """

  clip_ratio: Any = 0.2
  clip_ratio_low: Any = None
  clip_ratio_high: Any = None
  clip_ratio_c: Any = 3.0

  def __post_init__(self):
    self._check_clip()

  def surrogate(self, tokens):
    return self._ppo_surrogate(tokens, dual=True)


@register("entropy")
class EntropyBonus(Control, PPOClip):
  """PPO plus an entropy bonus: loss - entropy_coeff * agg(H) (verl: policy_loss -= coeff * H).

  H is the full-vocabulary entropy of the logits / temperature at each valid position (the
  loss's `temperature=`, the sampling temperature), so the loss needs `logits=`. Its gradient
  touches every vocabulary entry at every valid position: a dense, persistent bias whose fixed
  point is softmax(r / alpha) in a bandit (THEORY.md T2).
  verl's entropy_coeff defaults to 0 (off, which is `NoControl`): here it must be given.

  Attributes:
    entropy_coeff: alpha >= 0, or a schedule `step -> alpha` (covrl.schedules, optax).
    clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c: the PPO loss, as `NoControl`.
  """

  entropy_coeff: Any
  clip_ratio: Any = 0.2
  clip_ratio_low: Any = None
  clip_ratio_high: Any = None
  clip_ratio_c: Any = 3.0

  strength: ClassVar[str] = "entropy_coeff"
  needs_logits: ClassVar[bool] = True
  coefficient_field: ClassVar[str] = "entropy_coeff"

  def __post_init__(self):
    check_coefficient("entropy_coeff", self.entropy_coeff)
    self._check_clip()

  @classmethod
  def paper_explodes(cls) -> EntropyBonus:
    """entropy_coeff = 1e-2, the setting at which Cui et al. (2025) saw entropy explode."""
    return cls(entropy_coeff=1e-2)

  def surrogate(self, tokens):
    return self._ppo_surrogate(tokens, dual=True)

  def bonus_coefficient(self, step=None):
    return self.strength_at(step)

  def touched(self, tokens, surrogate, selection):
    return tokens.valid

  def check_call(self, *, key, step, has_logits, has_selected, has_weights=False):
    del has_weights, key, has_selected
    if not has_logits:
      raise ValueError("EntropyBonus needs the full-vocabulary entropy: pass logits=[B, T, V] "
                       "or entropy=[B, T] (covrl.token_log_probs_and_entropy).")
    if callable(self.entropy_coeff) and step is None:
      raise ValueError("entropy_coeff is a schedule: pass the optimisation step as `step=`.")


@register("clip_higher")
class ClipHigher(Control, PPOClip):
  """PPO with the upper clip raised (DAPO's clip-higher): eps_high > eps_low.

  The defaults are DAPO's (verl has no clip-higher method: its recipe sets clip_ratio_high).

  Attributes:
    clip_ratio_low: eps_low (DAPO: 0.2).
    clip_ratio_high: eps_high > eps_low (DAPO: 0.28); the strength.
    clip_ratio_c: dual-clip bound (verl: 3.0; None: off).
  """

  clip_ratio_low: Any = 0.2
  clip_ratio_high: Any = 0.28
  clip_ratio_c: Any = 3.0

  strength: ClassVar[str] = "clip_ratio_high"

  @property
  def clip_ratio(self):
    return self.clip_ratio_low

  def __post_init__(self):
    self._check_clip()
    low, high = (_checks.concrete_float(v) for v in (self.clip_ratio_low, self.clip_ratio_high))
    if low is not None and high is not None and not high > low:
      raise ValueError(f"ClipHigher needs clip_ratio_high > clip_ratio_low, got {high!r} <= "
                       f"{low!r}.")

  def surrogate(self, tokens):
    return self._ppo_surrogate(tokens, dual=True)

  def touched(self, tokens, surrogate, selection):
    # Tokens the raised upper clip lets through: A > 0 and 1 + low < ratio <= 1 + high.
    r = lax.stop_gradient(ratio(tokens))
    return tokens.valid & (tokens.advantages > 0) & (r > 1 + self.clip_ratio_low) & (
        r <= 1 + self.clip_ratio_high)

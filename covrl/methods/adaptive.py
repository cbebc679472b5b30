"""Skywork-OR1's adaptive entropy coefficient as a control value: a bonus with its controller.

`AdaptiveEntropyBonus` is an `EntropyBonus` (the same loss, dense bias and labs) that also
carries the rule that sets its coefficient. `controller(vocab_size)` returns that rule as a
`covrl.controllers.reactive` controller, which the closed-loop labs run (its state holds the
level; the value itself stays a frozen, stateless description)::

  bonus = covrl.AdaptiveEntropyBonus()                       # Skywork-OR1's setting
  ctl = bonus.controller(vocab_size=V)
  state = ctl.init()
  coef, state = ctl.update(state, entropy)                   # before each update
  loss, m = covrl.policy_loss(bonus.with_strength(coef), ..., logits=logits)

or, in the tabular lab, `tabular.make_controlled_train(config, bonus.controller(K),
bonus.entropy_target)` with `config.control = bonus`. Used with a fixed coefficient (no
controller), it is the plain bonus at `entropy_coeff`.

References:
  J. He et al., Skywork Open Reasoner 1 Technical Report, arXiv:2505.22312 (2025), Sec. 3.2;
  github.com/SkyworkAI/Skywork-OR1 (the adaptive_entropy options of its training scripts).
  TRL (huggingface/trl 1.16), GRPOConfig.use_adaptive_entropy and its entropy_coef_* options.
"""

from __future__ import annotations

import math
from typing import Any

from covrl import _checks
from covrl.methods.base import register
from covrl.methods.ppo import EntropyBonus


@register("adaptive_entropy", static=("entropy_target", "delay"))
class AdaptiveEntropyBonus(EntropyBonus):
  """The entropy bonus with Skywork-OR1's adaptive coefficient (TRL's use_adaptive_entropy).

  Before each update, with e_t the measured entropy and H* the target (`controller()`)::

    level_{t+1} = clip(level_t + delta if e_t < H* else level_t - delta, c_min, c_max)
    entropy_coeff_t = level_{t+1} if e_t < H* else 0

  The loss is `EntropyBonus`'s at entropy_coeff_t. The names are TRL's keywords; the defaults
  are Skywork-OR1's (its 32B script: target 0.2, delta 1e-4, range [0, 5e-3], level_0 0);
  `trl()` gives TRL's defaults (delta 5e-3, range [0, 1]).

  Attributes:
    entropy_coeff: the coefficient applied (the strength the controller sets); level_0 of the
      controller, in [entropy_coef_min, entropy_coef_max].
    entropy_target: H*, in nats: a number or a path t -> H*(t) (covrl.controllers.targets).
    entropy_coef_delta: the level's step per update, > 0.
    entropy_coef_min, entropy_coef_max: the level's range.
    delay: 0 (the entropy of the policy about to be updated) or 1 (the previous update's, as
      the released code and TRL measure it).
    clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c: the PPO loss, as `NoControl`.
  """

  entropy_coeff: Any = 0.0
  entropy_target: Any = 0.2
  entropy_coef_delta: Any = 1e-4
  entropy_coef_min: Any = 0.0
  entropy_coef_max: Any = 5e-3
  delay: int = 0

  def __post_init__(self):
    super().__post_init__()
    low, high = (_checks.concrete_float(v) for v in (self.entropy_coef_min,
                                                      self.entropy_coef_max))
    if low is not None and high is not None and not (0.0 <= low < high and math.isfinite(high)):
      raise ValueError(f"the coefficient range needs 0 <= entropy_coef_min < entropy_coef_max, "
                       f"got ({low!r}, {high!r}).")
    _checks.check_positive("entropy_coef_delta", self.entropy_coef_delta)
    c = _checks.concrete_float(self.entropy_coeff)
    if c is not None and low is not None and high is not None and not low <= c <= high:
      raise ValueError(f"entropy_coeff (the initial level) must lie in [{low}, {high}], got "
                       f"{c!r}.")
    if self.delay not in (0, 1):
      raise ValueError(f"delay must be 0 or 1, got {self.delay!r}.")
    if not callable(self.entropy_target):
      _checks.check_nonnegative("entropy_target", self.entropy_target)

  @classmethod
  def trl(cls, entropy_target: Any = 0.2) -> AdaptiveEntropyBonus:
    """TRL's defaults: delta 5e-3, range [0, 1], initial coefficient 0, delay 1."""
    return cls(entropy_coeff=0.0, entropy_target=entropy_target, entropy_coef_delta=5e-3,
               entropy_coef_min=0.0, entropy_coef_max=1.0, delay=1)

  def controller(self, vocab_size: int, num_steps: int | None = None):
    """The coefficient's rule: `covrl.controllers.reactive` with this value's settings.

    Args:
      vocab_size: V (the target must lie in [0, log V]).
      num_steps: horizon on which a callable target is checked.

    Returns:
      A `covrl.controllers.Controller` whose `update(state, entropy)` gives entropy_coeff_t.
    """
    from covrl import controllers  # the controllers sit above the control values

    return controllers.reactive(
        self.entropy_target, vocab_size=vocab_size, delta=self.entropy_coef_delta,
        coef_range=(float(self.entropy_coef_min), float(self.entropy_coef_max)),
        init_coef=float(self.entropy_coeff), delay=self.delay, num_steps=num_steps)

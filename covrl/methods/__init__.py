"""Entropy-control methods as values: each method is one frozen, validated pytree.

A control value names a method and holds its hyperparameters, with verl's keyword names and
verl's defaults; the paper's settings are presets. The same value configures the token loss
(`covrl.policy_loss`), the optax transform for logit parameters (`covrl.transform`), both labs
and the controllers, which set its `strength`::

  NoControl    PPO's clipped surrogate (verl's "vanilla" loss; clip_ratio=None: unclipped PG).
  EntropyBonus the same plus -entropy_coeff * agg(H), H the full-vocabulary token entropy.
  ClipHigher   PPO with a wider upper clip (DAPO: clip_ratio_low 0.2, clip_ratio_high 0.28).
  ClipCov      PPO with a random few tokens of the covariance band detached (Cui et al.).
  KLCov        unclipped PG plus ppo_kl_coef |log pi - log pi_old| on the top-covariance tokens.
  ForkingTokens     PPO on the top_entropy_quantile highest-entropy tokens only (Wang et al.).
  EntropyAdvantage  PPO with `A + min(alpha H, |A| / kappa)`, H detached (Cheng et al.).
  WReinforce        PPO with positive advantages scaled by lambda (Zhu et al., W-REINFORCE).
  STEER             PPO with each token weighted down by its predicted entropy change.
  AdaptiveEntropyBonus  the bonus whose coefficient Skywork-OR1's rule sets (`controller()`).

Numeric fields are pytree leaves (a number, a traced scalar or, for coefficients, a
`covrl.schedules.PowerDecay`); options (selection scope, counts, bounds, other schedules) are
static. Values built from Python numbers are checked when built. Closed over by a jitted
function, a Python ratio keeps verl's exact count max(int(ratio * N), 1); a traced ratio (the
value passed through jit, or a controller's) is rounded in float32 and needs the static bound
`max_ratio` that sizes the selection (a PowerDecay schedule's first value serves as one).

Each method is one class: its hooks (`surrogate`, `select`, `loss_change`, `bonus_coefficient`,
`touched`; see `base.Control`) are the only place its semantics live, and the losses,
transforms and labs call them; `METHODS` maps the registered names to the classes.

References:
  Schulman et al., Proximal Policy Optimization Algorithms, arXiv:1707.06347 (2017).
  Ye et al., Mastering Complex Control in MOBA Games with Deep RL (dual clip), arXiv:1912.09729.
  Yu et al., DAPO (clip-higher), arXiv:2503.14476 (2025).
  Cui et al., The Entropy Mechanism of RL for Reasoning LMs (Clip-Cov, KL-Cov), arXiv:2505.22617.
  Wang et al., Beyond the 80/20 Rule (forking tokens), arXiv:2506.01939 (2025).
  Cheng et al., Reasoning with Exploration: An Entropy Perspective, arXiv:2506.14758 (2025).
  Zhu et al., The Surprising Effectiveness of Negative Reinforcement, arXiv:2506.01347 (2025).
  Hao et al., Rethinking Entropy Interventions in RLVR (STEER), arXiv:2510.10150 (2025).
  He et al., Skywork Open Reasoner 1 Technical Report, arXiv:2505.22312 (2025).
"""

from covrl.methods.adaptive import AdaptiveEntropyBonus
from covrl.methods.base import METHODS, Control, PPOClip, check_control, method, register
from covrl.methods.covariance import ClipCov, KLCov, abs_zero_grad_at_zero
from covrl.methods.forking import ForkingTokens, entropy_threshold, high_entropy_select
from covrl.methods.ppo import ClipHigher, EntropyBonus, NoControl
from covrl.methods.shaping import EntropyAdvantage, WReinforce
from covrl.methods.steer import STEER

__all__ = [
    "AdaptiveEntropyBonus",
    "ClipCov",
    "ClipHigher",
    "Control",
    "EntropyAdvantage",
    "EntropyBonus",
    "ForkingTokens",
    "KLCov",
    "METHODS",
    "NoControl",
    "PPOClip",
    "STEER",
    "WReinforce",
    "abs_zero_grad_at_zero",
    "check_control",
    "entropy_threshold",
    "high_entropy_select",
    "method",
    "register",
]

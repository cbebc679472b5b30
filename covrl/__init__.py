"""covrl: entropy control for reinforcement-learning post-training of language models, in JAX.

This module is the library's public surface: math on logits, token selection, the control
values and their losses, optax transforms, schedules and controllers. `import covrl` loads only
these (JAX, optax and NumPy); the labs and the experiments are subpackages, loaded when used:
`covrl.tabular` (bandits, tabular dynamics), `covrl.transformer` (a Flax GRPO lab; the
`transformer` extra), `covrl.experiments` (the claims, the report and the `covrl` command; the
`experiments` extra).
"""

from covrl import controllers, diagnostics, schedules
from covrl.advantages import grpo_advantages
from covrl.aggregation import LOSS_AGG_MODES, Aggregate, aggregate, denominator
from covrl.covariance import masked_mean, token_covariance
from covrl.entropy_prediction import (
    linearized_logit_update,
    pooled_entropy,
    pooled_entropy_change,
)
from covrl.losses import (
    clip_cov_loss,
    entropy_bonus_loss,
    kl_cov_loss,
    policy_gradient_loss,
    policy_loss,
    ppo_loss,
    select_tokens,
)
from covrl.methods import (
    METHODS,
    STEER,
    AdaptiveEntropyBonus,
    ClipCov,
    ClipHigher,
    Control,
    EntropyAdvantage,
    EntropyBonus,
    ForkingTokens,
    KLCov,
    NoControl,
    WReinforce,
    abs_zero_grad_at_zero,
    high_entropy_select,
    method,
)
from covrl.metrics import loss_metrics
from covrl.selection import Selection, clip_cov_select, kl_cov_select, selection_count
from covrl.softmax_entropy import (
    ScoreTerms,
    entropy,
    entropy_change,
    entropy_change_first_order,
    entropy_change_integral,
    entropy_change_second_order,
    entropy_grad,
    policy_covariance,
    score_step_entropy_change,
    score_terms,
)
from covrl.tokens import PolicyTokens, Surrogate, policy_tokens
from covrl.transforms import ControlState, transform
from covrl.vocab import token_entropy_and_change, token_log_probs_and_entropy

__version__ = "0.2.0"

__all__ = [
    "AdaptiveEntropyBonus",
    "Aggregate",
    "ClipCov",
    "ClipHigher",
    "Control",
    "ControlState",
    "EntropyAdvantage",
    "EntropyBonus",
    "ForkingTokens",
    "KLCov",
    "LOSS_AGG_MODES",
    "METHODS",
    "NoControl",
    "PolicyTokens",
    "STEER",
    "ScoreTerms",
    "Selection",
    "Surrogate",
    "WReinforce",
    "__version__",
    "abs_zero_grad_at_zero",
    "aggregate",
    "clip_cov_loss",
    "clip_cov_select",
    "controllers",
    "denominator",
    "diagnostics",
    "entropy",
    "entropy_bonus_loss",
    "entropy_change",
    "entropy_change_first_order",
    "entropy_change_integral",
    "entropy_change_second_order",
    "entropy_grad",
    "grpo_advantages",
    "high_entropy_select",
    "kl_cov_loss",
    "kl_cov_select",
    "linearized_logit_update",
    "loss_metrics",
    "masked_mean",
    "method",
    "policy_covariance",
    "policy_gradient_loss",
    "policy_loss",
    "policy_tokens",
    "pooled_entropy",
    "pooled_entropy_change",
    "ppo_loss",
    "schedules",
    "score_step_entropy_change",
    "score_terms",
    "select_tokens",
    "selection_count",
    "token_covariance",
    "token_entropy_and_change",
    "token_log_probs_and_entropy",
    "transform",
]

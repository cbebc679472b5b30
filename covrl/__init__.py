"""covrl: entropy control for reinforcement-learning post-training of language models, in JAX.

The public surface is this module: every name in `__all__` is documented in README.md.
"""

from covrl import bandits, controllers, schedules, tabular, tabular_control, theory
from covrl.advantages import grpo_advantages
from covrl.aggregation import LOSS_AGG_MODES, Aggregate, aggregate, denominator
from covrl.covariance import masked_mean, token_covariance
from covrl.entropy_prediction import (
    linearized_logit_update,
    pooled_entropy,
    pooled_entropy_change,
)
from covrl.losses import (
    abs_zero_grad_at_zero,
    clip_cov_loss,
    entropy_bonus_loss,
    kl_cov_loss,
    policy_gradient_loss,
    ppo_loss,
)
from covrl.selection import clip_cov_select, kl_cov_select, selection_count
from covrl.softmax_entropy import (
    entropy,
    entropy_change,
    entropy_change_first_order,
    entropy_change_integral,
    entropy_change_second_order,
    entropy_grad,
    policy_covariance,
)
from covrl.transforms import ControlState, clip_cov, entropy_bonus, kl_cov

__version__ = "0.1.0"

__all__ = [
    "Aggregate",
    "ControlState",
    "LOSS_AGG_MODES",
    "__version__",
    "abs_zero_grad_at_zero",
    "aggregate",
    "bandits",
    "clip_cov",
    "clip_cov_loss",
    "clip_cov_select",
    "controllers",
    "denominator",
    "entropy",
    "entropy_bonus",
    "entropy_bonus_loss",
    "entropy_change",
    "entropy_change_first_order",
    "entropy_change_integral",
    "entropy_change_second_order",
    "entropy_grad",
    "grpo_advantages",
    "kl_cov",
    "kl_cov_loss",
    "kl_cov_select",
    "linearized_logit_update",
    "masked_mean",
    "policy_covariance",
    "policy_gradient_loss",
    "pooled_entropy",
    "pooled_entropy_change",
    "ppo_loss",
    "schedules",
    "selection_count",
    "tabular",
    "tabular_control",
    "theory",
    "token_covariance",
]

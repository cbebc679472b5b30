"""The transformer lab: a small Flax policy trained with GRPO on verifiable-reward tasks.

Entropy control (covrl's control values: `covrl.EntropyBonus`, `covrl.ClipHigher`,
`covrl.ClipCov`, `covrl.KLCov`) in a real sequence policy: a decoder-only transformer
(`TransformerPolicy`), tasks with verifiable rewards (`tasks`), temperature sampling (`sample`),
a supervised warm start (`SFTConfig`) and a GRPO loop (`make_train`, `Trainer`, `run_training`
for long runs with checkpoints); `controlled` puts a `covrl.controllers` controller in the loop
and `lab` holds the lab's standard setting and its comparison of methods. On tasks whose
responses can all be listed (`tree.TreeTask`), `exact` trains the same policy with the exact
expected update instead of a sampled one.

Example:
  >>> import jax, covrl
  >>> from covrl import transformer as tf
  >>> config = tf.GRPOConfig(tf.tasks.Sort(6, 3), control=covrl.KLCov(kl_cov_ratio=2e-3),
  ...                        num_steps=2, sft=None)
  >>> state, metrics = tf.make_train(config)(jax.random.key(0))
  >>> sorted(metrics)[:3]
  ['approx_kl', 'clip_frac', 'clip_frac_lower']
"""

from covrl.transformer import controlled, exact, lab, tasks, tree
from covrl.transformer.config import GRPOConfig
from covrl.transformer.grpo import Trainer, TrainState, get_trainer, make_train
from covrl.transformer.loss import Batch, control_at, normalize_control, policy_loss
from covrl.transformer.model import ModelConfig, TransformerPolicy, init_params, num_params
from covrl.transformer.runner import run_training
from covrl.transformer.sampling import (
    Rollout,
    response_hidden,
    response_logits,
    sample,
    token_log_probs,
)
from covrl.transformer.sft import SFTConfig

__all__ = [
    "Batch",
    "GRPOConfig",
    "ModelConfig",
    "Rollout",
    "SFTConfig",
    "TrainState",
    "Trainer",
    "TransformerPolicy",
    "control_at",
    "controlled",
    "exact",
    "get_trainer",
    "init_params",
    "lab",
    "make_train",
    "normalize_control",
    "num_params",
    "policy_loss",
    "response_hidden",
    "response_logits",
    "run_training",
    "sample",
    "tasks",
    "token_log_probs",
    "tree",
]

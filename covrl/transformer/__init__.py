"""The transformer lab: a small Flax policy trained with GRPO on verifiable-reward tasks.

Entropy control (entropy bonus, clip-higher, Clip-Cov, KL-Cov: `control`) in a real sequence policy:
a decoder-only transformer (`TransformerPolicy`), tasks with verifiable rewards (`tasks`),
temperature sampling (`sample`), a supervised warm start (`SFTConfig`) and a GRPO loop
(`make_train`, `Trainer`, `run_training` for long runs with checkpoints).

Example:
  >>> import jax
  >>> from covrl import transformer as tf
  >>> config = tf.GRPOConfig(tf.tasks.Sort(6, 3), control=tf.control.kl_cov(2e-3), num_steps=2,
  ...                        sft=None)
  >>> state, metrics = tf.make_train(config)(jax.random.key(0))
  >>> sorted(metrics)[:3]
  ['approx_kl', 'clip_frac', 'clip_frac_lower']
"""

from covrl.transformer import control, controlled, lab, tasks
from covrl.transformer.bench import benchmark, benchmark_hook
from covrl.transformer.config import GRPOConfig
from covrl.transformer.control import METHODS, Control
from covrl.transformer.grpo import Trainer, TrainState, get_trainer, make_train
from covrl.transformer.model import ModelConfig, TransformerPolicy, init_params, num_params
from covrl.transformer.runner import run_training
from covrl.transformer.sampling import Rollout, response_logits, sample, token_log_probs
from covrl.transformer.sft import SFTConfig

__all__ = [
    "METHODS",
    "Control",
    "GRPOConfig",
    "ModelConfig",
    "Rollout",
    "SFTConfig",
    "TrainState",
    "Trainer",
    "TransformerPolicy",
    "benchmark",
    "benchmark_hook",
    "control",
    "controlled",
    "get_trainer",
    "init_params",
    "lab",
    "make_train",
    "num_params",
    "response_logits",
    "run_training",
    "sample",
    "tasks",
    "token_log_probs",
]

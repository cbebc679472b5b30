"""Supervised warm start on imperfect demonstrations.

RL post-training starts from a model that already answers with some skill and some doubt. Here the
demonstrations are the task's correct answers with each answer token independently replaced, with
probability `noise`, by a token drawn uniformly from the whole vocabulary (EOS included). A policy
fitted to them puts about 1 - noise + noise / V on the right token and spreads the rest, so RL
starts with real entropy, and sometimes stops early (EOS), as a language model does.

The loss is the mean cross-entropy of the demonstrated response tokens given the prompt and the
tokens before them (temperature 1), minimised with Adam for `num_steps` steps on fresh batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from covrl.transformer import sampling
from covrl.transformer.model import TransformerPolicy
from covrl.transformer.tasks import Task


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  """Supervised warm start.

  Attributes:
    num_steps: Adam steps (0 skips the warm start).
    batch_size: demonstrations per step.
    learning_rate: Adam step size.
    noise: probability in [0, 1) that a demonstrated answer token is replaced by a uniformly
      random token.
  """

  num_steps: int = 300
  batch_size: int = 64
  learning_rate: float = 3e-3
  noise: float = 0.3

  def __post_init__(self):
    if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or (
        self.num_steps < 0):
      raise ValueError(f"num_steps must be an int >= 0, got {self.num_steps!r}.")
    if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or (
        self.batch_size < 1):
      raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}.")
    if not (isinstance(self.learning_rate, int | float) and 0 < self.learning_rate < float("inf")):
      raise ValueError(f"learning_rate must be finite and > 0, got {self.learning_rate!r}.")
    if not (isinstance(self.noise, int | float) and 0 <= self.noise < 1):
      raise ValueError(f"noise must be a probability in [0, 1), got {self.noise!r}.")


def demonstrations(task: Task, key: jax.Array, n: int, noise: float) -> tuple[jax.Array, jax.Array]:
  """n prompts with noisy demonstrated answers: the task's own demonstrator (`Task.demonstrate`).

  Returns:
    (prompts [n, P], responses [n, R]): by default each answer token is replaced, with
    probability `noise`, by a token uniform over the task's vocabulary; a task may demonstrate
    differently (ForkCopy takes its trap at the forks).
  """
  return task.demonstrate(key, n, noise)


def make_sft(model: TransformerPolicy, task: Task, config: SFTConfig):
  """Build `sft(params, key) -> (params, losses)`, a pure function (jit it, or call it in jit).

  Args:
    model: the policy module (its config must fit the task).
    task: the task the demonstrations come from.
    config: SFTConfig.

  Returns:
    sft(params, key) -> (fine-tuned params, [num_steps] training losses).
  """
  optimizer = optax.adam(config.learning_rate)

  def loss_fn(params, prompts, responses):
    logits = sampling.response_logits(model, params, prompts, responses, temperature=1.0)
    return -jnp.mean(sampling.token_log_probs(logits, responses))

  def sft(params: Any, key: jax.Array):
    def step(carry, k):
      params, opt_state = carry
      prompts, responses = demonstrations(task, k, config.batch_size, config.noise)
      loss, grads = jax.value_and_grad(loss_fn)(params, prompts, responses)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    keys = jax.random.split(key, config.num_steps)
    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), keys)
    return params, losses

  return sft

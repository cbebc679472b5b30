"""Configuration of a GRPO run of the transformer lab, validated before anything compiles."""

from __future__ import annotations

import dataclasses
from typing import Any

import covrl
from covrl.transformer.control import Control, check_number, no_control
from covrl.transformer.model import ModelConfig
from covrl.transformer.sft import SFTConfig
from covrl.transformer.tasks import Task


def _count(name: str, value: Any, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """A GRPO run.

  Attributes:
    task: the task (covrl.transformer.tasks).
    model: the policy's shape; None gives the default ModelConfig sized to the task.
    control: the entropy-control method (covrl.transformer.control).
    num_steps: GRPO steps (rollout + update).
    prompts_per_step: prompts per step; the batch has prompts_per_step * group_size responses.
    group_size: responses per prompt G (>= 2 for group-normalised advantages).
    temperature: sampling temperature tau; old log-probs, losses and entropies use z / tau too.
    ppo_epochs: passes over each batch.
    num_minibatches: optimizer steps per epoch (must divide the batch).
    learning_rate: Adam step size.
    max_grad_norm: global-norm gradient clip (None: off).
    loss_agg_mode: covrl aggregation mode (verl's names).
    normalize_std: divide advantages by the group std (GRPO) or not (Dr. GRPO).
    dual_clip: dual-clip bound c > 1 of the PPO-clipped methods (verl: 3.0; None: off).
    token_ratio_bound: static upper bound on the token ratio of Clip-Cov / KL-Cov this run's
      compiled program can take (sizes the selection buffer); None: the control's own ratio.
    kv_cache: sample with the key/value cache instead of recomputing (see sampling.sample).
    sft: the supervised warm start (None: start from the random initialisation).
  """

  task: Task
  model: ModelConfig | None = None
  control: Control = dataclasses.field(default_factory=no_control)
  num_steps: int = 100
  prompts_per_step: int = 16
  group_size: int = 8
  temperature: float = 1.0
  ppo_epochs: int = 1
  num_minibatches: int = 2
  learning_rate: float = 1e-3
  max_grad_norm: float | None = 1.0
  loss_agg_mode: str = "token-mean"
  normalize_std: bool = True
  dual_clip: float | None = 3.0
  token_ratio_bound: float | None = None
  kv_cache: bool = False
  sft: SFTConfig | None = dataclasses.field(default_factory=SFTConfig)

  def __post_init__(self):
    if not isinstance(self.task, Task):
      raise TypeError(f"task must be a covrl.transformer task, got {type(self.task).__name__}.")
    if self.model is None:
      object.__setattr__(self, "model", ModelConfig(
          vocab_size=self.task.vocab_size, context_length=self.task.context_length))
    if not isinstance(self.model, ModelConfig):
      raise TypeError(f"model must be a ModelConfig, got {type(self.model).__name__}.")
    if self.model.vocab_size < self.task.vocab_size:
      raise ValueError(f"model vocab_size={self.model.vocab_size} is smaller than the task's "
                       f"vocabulary ({self.task.vocab_size}).")
    if self.model.context_length < self.task.context_length:
      raise ValueError(f"model context_length={self.model.context_length} is shorter than the "
                       f"task's prompt + response ({self.task.context_length}).")
    if not isinstance(self.control, Control):
      raise TypeError(f"control must be a Control, got {type(self.control).__name__}.")
    _count("num_steps", self.num_steps, 0)
    _count("prompts_per_step", self.prompts_per_step)
    _count("group_size", self.group_size, 2)
    check_number("temperature", self.temperature, strict=True)
    _count("ppo_epochs", self.ppo_epochs)
    _count("num_minibatches", self.num_minibatches)
    if self.batch_size % self.num_minibatches:
      raise ValueError(f"num_minibatches={self.num_minibatches} must divide the batch of "
                       f"{self.batch_size} responses.")
    check_number("learning_rate", self.learning_rate, strict=True)
    if self.max_grad_norm is not None:
      check_number("max_grad_norm", self.max_grad_norm, strict=True)
    if self.loss_agg_mode not in covrl.LOSS_AGG_MODES:
      raise ValueError(f"unknown loss_agg_mode {self.loss_agg_mode!r}; choose one of "
                       f"{covrl.LOSS_AGG_MODES}.")
    if self.dual_clip is not None:
      check_number("dual_clip", self.dual_clip, low=1.0, strict=True)
    if self.token_ratio_bound is not None:
      check_number("token_ratio_bound", self.token_ratio_bound)
      if self.token_ratio_bound > 1:
        raise ValueError(f"token_ratio_bound must be <= 1, got {self.token_ratio_bound!r}.")
      if self.control.ratio > self.token_ratio_bound:
        raise ValueError(f"control ratio {self.control.ratio} exceeds token_ratio_bound="
                         f"{self.token_ratio_bound}.")
    if self.sft is not None and not isinstance(self.sft, SFTConfig):
      raise TypeError(f"sft must be an SFTConfig or None, got {type(self.sft).__name__}.")

  @property
  def batch_size(self) -> int:
    return self.prompts_per_step * self.group_size

  @property
  def minibatch_size(self) -> int:
    return self.batch_size // self.num_minibatches

  @property
  def ratio_bound(self) -> float:
    return self.control.ratio if self.token_ratio_bound is None else self.token_ratio_bound

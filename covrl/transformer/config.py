"""Configuration of a GRPO run of the transformer lab, validated before anything compiles."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import covrl
from covrl import schedules
from covrl.transformer.model import ModelConfig
from covrl.transformer.sft import SFTConfig
from covrl.transformer.tasks import Task


def _number(name: str, value: Any, *, low: float = 0.0, strict: bool = False) -> None:
  ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
  if not (ok and (value > low if strict else value >= low)):
    raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, "
                     f"got {value!r}.")


def control_ratio(control: covrl.Control) -> float | None:
  """The largest token ratio a control selects with (None for a control that selects none).

  A ratio is a number or a `covrl.schedules.PowerDecay` (which never exceeds its first value).
  """
  if control.ratio_field is None:
    return None
  value = getattr(control, control.ratio_field)
  bound = schedules.upper_bound(value)
  if bound is None:
    raise TypeError(f"{type(control).__name__}.{control.ratio_field} must be a number or a "
                    f"covrl.schedules.PowerDecay in the transformer lab, got {value!r}.")
  return bound


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """A GRPO run.

  Attributes:
    task: the task (covrl.transformer.tasks).
    model: the policy's shape; None gives the default ModelConfig sized to the task.
    control: the entropy-control method, a covrl control value (`covrl.NoControl()`,
      `covrl.EntropyBonus(1e-2)`, `covrl.KLCov.paper_7b()`, ...). Its coefficient may be a
      number or a `covrl.schedules.PowerDecay` over GRPO steps; PPO's clip range and dual clip
      are the control's (clip_ratio, clip_ratio_c).
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
    token_ratio_bound: static upper bound on the token ratio of Clip-Cov / KL-Cov this run's
      compiled program can take (it sizes the selection buffer: the control's `max_ratio`);
      None: the control's own ratio.
    kv_cache: sample with the key/value cache instead of recomputing (see sampling.sample).
    fused_head: the update's loss takes log pi(y) and the entropy from the final hidden states
      and the head's parameters through `covrl.token_log_probs_and_entropy` (chunks, custom
      VJP), never forming the [rows, R, V] logits or their gradient; off, it applies the head
      and takes them from the logits. Equal to float32 round-off (tests/test_vocab_lab.py);
      the rollout and the step's entropy metrics use the logits either way.
    fused_chunks: (token_chunk, vocab_chunk) of the fused head.
    sft: the supervised warm start (None: start from the random initialisation).
    diagnostics: also log, per step, the regime measurements of `covrl.diagnostics` on the
      step's batch (before its update): balance_coefficient (alpha* of the whole batch's PG
      surrogate and aggregated entropy), cov_share_top_0.2% / cov_share_top_2% (covariance
      concentration), band_tokens (valid tokens with 1 < c_i < 5, Clip-Cov's paper band, on
      the batch's pooled c_i), selected_per_minibatch (tokens the control acted on, mean over
      mini-batches) and pass_at_k (k = group_size; reward >= 1 counts as correct). Costs one
      forward and two backward passes of the batch per step.
  """

  task: Task
  model: ModelConfig | None = None
  control: covrl.Control = dataclasses.field(default_factory=covrl.NoControl)
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
  token_ratio_bound: float | None = None
  kv_cache: bool = False
  fused_head: bool = False
  fused_chunks: tuple[int, int] = (1024, 8192)
  sft: SFTConfig | None = dataclasses.field(default_factory=SFTConfig)
  diagnostics: bool = False

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
    if not isinstance(self.control, covrl.Control):
      raise TypeError(f"control must be a covrl control value (covrl.NoControl(), "
                      f"covrl.KLCov(), ...), got {type(self.control).__name__}.")
    covrl._checks.check_int("num_steps", self.num_steps, 0)
    covrl._checks.check_int("prompts_per_step", self.prompts_per_step, 1)
    covrl._checks.check_int("group_size", self.group_size, 2)
    _number("temperature", self.temperature, strict=True)
    covrl._checks.check_int("ppo_epochs", self.ppo_epochs, 1)
    covrl._checks.check_int("num_minibatches", self.num_minibatches, 1)
    if self.batch_size % self.num_minibatches:
      raise ValueError(f"num_minibatches={self.num_minibatches} must divide the batch of "
                       f"{self.batch_size} responses.")
    _number("learning_rate", self.learning_rate, strict=True)
    if self.max_grad_norm is not None:
      _number("max_grad_norm", self.max_grad_norm, strict=True)
    if self.loss_agg_mode not in covrl.LOSS_AGG_MODES:
      raise ValueError(f"unknown loss_agg_mode {self.loss_agg_mode!r}; choose one of "
                       f"{covrl.LOSS_AGG_MODES}.")
    ratio = control_ratio(self.control)
    if self.token_ratio_bound is not None:
      _number("token_ratio_bound", self.token_ratio_bound)
      if self.token_ratio_bound > 1:
        raise ValueError(f"token_ratio_bound must be <= 1, got {self.token_ratio_bound!r}.")
      if ratio is not None and ratio > self.token_ratio_bound:
        raise ValueError(f"control ratio {ratio} exceeds token_ratio_bound="
                         f"{self.token_ratio_bound}.")
    if not isinstance(self.fused_head, bool):
      raise TypeError(f"fused_head must be a bool, got {self.fused_head!r}.")
    if not (isinstance(self.fused_chunks, tuple) and len(self.fused_chunks) == 2):
      raise ValueError(f"fused_chunks must be (token_chunk, vocab_chunk), got "
                       f"{self.fused_chunks!r}.")
    covrl._checks.check_int("fused_chunks[0] (token_chunk)", self.fused_chunks[0], 1)
    covrl._checks.check_int("fused_chunks[1] (vocab_chunk)", self.fused_chunks[1], 1)
    if not isinstance(self.diagnostics, bool):
      raise TypeError(f"diagnostics must be a bool, got {self.diagnostics!r}.")
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
    """The static bound on the token ratio (the selecting controls' `max_ratio`)."""
    if self.token_ratio_bound is not None:
      return self.token_ratio_bound
    ratio = control_ratio(self.control)
    return 0.0 if ratio is None else ratio

"""The GRPO mini-batch loss of the transformer lab: covrl's policy loss of a control value.

`policy_loss` recomputes the tempered logits z / tau of a mini-batch, takes the log-probabilities
of its sampled tokens and applies `covrl.policy_loss` with the run's control value: PPO's clipped
surrogate (no control, clip-higher), the same plus the entropy bonus (fixed or Skywork-OR1's
adaptive one), Clip-Cov, KL-Cov, forking tokens, entropy advantage shaping, W-REINFORCE or STEER,
each exactly as covrl's token-level losses define it. Entropy is the full-vocabulary entropy of
the tempered logits; the controls that read it (forking tokens, shaping, STEER) get it from there.
With `GRPOConfig.fused_head` the log-probabilities and entropies come from the final hidden
states and the head's parameters through `covrl.token_log_probs_and_entropy` instead, and
`covrl.policy_loss` takes the entropies (entropy=) in place of the logits: the same loss and
gradient to float32 round-off, without the [rows, R, V] logits (and without the logits-only
metric loss_entropy_change).

The compiled step reads the control as a pytree whose numbers are traced (`normalize_control`):
one program runs every control of a family (a control class with its static options), for
example an entropy bonus with a constant or an annealed coefficient, and can be vmapped over
strengths.

References:
  Schulman et al., Proximal Policy Optimization Algorithms, arXiv:1707.06347 (2017).
  Yu et al., DAPO (clip-higher), arXiv:2503.14476 (2025).
  Cui et al., The Entropy Mechanism of RL for Reasoning LMs (Clip-Cov, KL-Cov), arXiv:2505.22617.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import covrl
from covrl import schedules
from covrl.tokens import with_entropy
from covrl.transformer import sampling
from covrl.transformer.config import GRPOConfig
from covrl.transformer.model import TransformerPolicy


class Batch(NamedTuple):
  """What the update needs from a rollout: one row per response, one column per token."""

  prompts: jax.Array
  responses: jax.Array
  response_mask: jax.Array
  old_log_probs: jax.Array
  advantages: jax.Array


def _schedule(name: str, value: Any) -> schedules.PowerDecay:
  if isinstance(value, schedules.PowerDecay):
    return value
  if callable(value):
    raise TypeError(f"{name} must be a number or a covrl.schedules.PowerDecay in the "
                    f"transformer lab (its compiled step reads the schedule's numbers), got "
                    f"{value!r}.")
  return schedules.PowerDecay(value, 0.0, 1.0)  # a constant: power 0


def normalize_control(control: covrl.Control, ratio_bound: float) -> covrl.Control:
  """`control` in the form the compiled GRPO step reads, so that a family shares one program.

  Every number becomes a float32 array (a traced leaf), the coefficient (`coefficient_field`)
  always a `covrl.schedules.PowerDecay` (a constant has power 0; a scheduled strength or ratio
  must be one too), PPO's clip range is resolved
  into clip_ratio_low / clip_ratio_high, and a selecting control's `max_ratio` (the static bound
  that sizes its selection buffer) is `ratio_bound`. Values of one family (same class, same
  static options) then have the same pytree structure.

  Args:
    control: a covrl control value; coefficients and ratios are numbers or PowerDecay.
    ratio_bound: the run's static bound on the token ratio (GRPOConfig.ratio_bound).

  Returns:
    The normalized control (not validated again: its leaves may be traced later).
  """
  if not isinstance(control, covrl.Control):
    raise TypeError(f"control must be a covrl control value, got {type(control).__name__}.")
  names = {f.name for f in dataclasses.fields(control)}
  fields: dict[str, Any] = {}
  if control.coefficient_field is not None:
    name = control.coefficient_field
    fields[name] = _schedule(name, getattr(control, name))
  for name in {control.ratio_field, control.strength} - {None, control.coefficient_field}:
    value = getattr(control, name)
    if callable(value) and not isinstance(value, schedules.PowerDecay):
      _schedule(name, value)  # raises
  if {"clip_ratio", "clip_ratio_low", "clip_ratio_high"} <= names and (
      control.clip_ratio is not None):
    fields["clip_ratio_low"], fields["clip_ratio_high"] = control.clip_range()
  if "max_ratio" in names:
    fields["max_ratio"] = float(ratio_bound)
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), control.replace(**fields))


def control_at(control: covrl.Control, step: jax.Array | int) -> tuple[covrl.Control, jax.Array]:
  """(the control with its schedules evaluated at GRPO step `step`, its coefficient there).

  The coefficient is 0 for a control without one (NoControl, ClipHigher, ClipCov).
  """
  fields: dict[str, Any] = {}
  coef = jnp.zeros((), jnp.float32)
  if control.coefficient_field is not None:
    coef = control.value_of(control.coefficient_field, step)
    fields[control.coefficient_field] = coef
  for name in {control.ratio_field, control.strength} - {None, control.coefficient_field}:
    fields[name] = control.value_of(name, step)
  return control.replace(**fields), coef


def policy_loss(config: GRPOConfig, model: TransformerPolicy, params, batch: Batch,
                key: jax.Array, control: covrl.Control, step: jax.Array | int,
                on_policy: jax.Array | bool = False):
  """The loss of one mini-batch under `control` at GRPO step `step`, and its metrics.

  `control` is normalized (`normalize_control`) or at least has a PowerDecay or a number as its
  coefficient; its schedules are evaluated at `step`. `key` draws Clip-Cov's tokens.

  `on_policy` marks an update whose parameters are still the rollout's (the first mini-batch of
  the first epoch). Its old log-probabilities are then the current ones, exactly: a recomputed
  log pi_old differs from log pi by float round-off, and KL-Cov's `|log pi - log pi_old|` has
  gradient sign(x) * grad log pi, full-size for any x != 0, so round-off would switch the
  penalty on with a random sign where the theory has it inert (THEORY.md T3.6). The metric
  "max_abs_log_ratio" still measures against the recomputed values (the round-off itself).

  Returns:
    (loss, (metrics, selected)): the metrics of `covrl.policy_loss` plus control_coef (the
    coefficient at `step`, 0 without one) and max_abs_log_ratio; selected is the [rows, R] mask
    of tokens a selecting method chose (Clip-Cov's and KL-Cov's, the tokens forking tokens
    trains on; all False for the other methods).
  """
  tau = config.temperature
  mask, adv = batch.response_mask, batch.advantages
  raw = entropy = None
  if config.fused_head:
    hidden = sampling.response_hidden(model, params, batch.prompts, batch.responses)
    head = params["head"]
    token_chunk, vocab_chunk = config.fused_chunks
    log_prob, entropy = covrl.token_log_probs_and_entropy(
        hidden, head["kernel"], batch.responses, bias=head["bias"], mask=mask,
        temperature=tau, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
  else:
    raw = sampling.response_logits(model, params, batch.prompts, batch.responses, 1.0)
    log_prob = sampling.token_log_probs(raw / tau, batch.responses)
  old = jnp.where(on_policy, jax.lax.stop_gradient(log_prob), batch.old_log_probs)
  control, coef = control_at(control, step)
  if control.selects_tokens:
    # Select here, to return the mask; the loss then uses this selection.
    tokens = covrl.policy_tokens(old, log_prob, adv, mask)
    if control.needs_entropy:  # forking tokens rank by the entropy of the tempered logits
      tokens = with_entropy(tokens, logits=raw, entropy=entropy, temperature=tau)
    _, selection = covrl.select_tokens(control, tokens, control.surrogate(tokens), key=key)
    selected = selection.mask
  else:
    selected = jnp.zeros(log_prob.shape, bool)
  loss, metrics = covrl.policy_loss(
      control, old, log_prob, adv, mask, key=key, logits=raw, entropy=entropy, temperature=tau,
      selected=selected if control.selects_tokens else None,
      loss_agg_mode=config.loss_agg_mode)
  metrics["control_coef"] = coef
  log_ratio = jax.lax.stop_gradient(log_prob - batch.old_log_probs)
  metrics["max_abs_log_ratio"] = jnp.max(jnp.where(mask, jnp.abs(log_ratio), 0.0))
  return loss, (metrics, selected)

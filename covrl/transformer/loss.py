"""The GRPO mini-batch loss of the transformer lab, with the control method as traced arrays.

`policy_loss` recomputes the tempered logits z / tau of a mini-batch, takes the log-probabilities
of its sampled tokens and applies the loss of the method named in `ControlArrays`: PPO's clipped
surrogate (no control, entropy bonus, clip-higher), Clip-Cov or KL-Cov, each exactly as covrl's
token-level losses define it, plus the entropy bonus (its coefficient is 0 for the other methods).
Entropy is the full-vocabulary entropy of the tempered logits.

References:
  Schulman et al., Proximal Policy Optimization Algorithms, arXiv:1707.06347 (2017).
  Yu et al., DAPO (clip-higher), arXiv:2503.14476 (2025).
  Cui et al., The Entropy Mechanism of RL for Reasoning LMs (Clip-Cov, KL-Cov), arXiv:2505.22617.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

import covrl
from covrl import losses as _losses
from covrl.transformer import sampling
from covrl.transformer.config import GRPOConfig
from covrl.transformer.control import ControlArrays
from covrl.transformer.model import TransformerPolicy


class Batch(NamedTuple):
  """What the update needs from a rollout: one row per response, one column per token."""

  prompts: jax.Array
  responses: jax.Array
  response_mask: jax.Array
  old_log_probs: jax.Array
  advantages: jax.Array


def policy_loss(config: GRPOConfig, model: TransformerPolicy, params, batch: Batch,
                key: jax.Array, control: ControlArrays, step: jax.Array,
                on_policy: jax.Array | bool = False):
  """The loss of one mini-batch under the control method in `control`, and its metrics.

  The method is a traced index: `lax.switch` runs only the branch it names (under vmap over
  methods, all branches run and are selected).

  `on_policy` marks an update whose parameters are still the rollout's (the first mini-batch of
  the first epoch). Its old log-probabilities are then the current ones, exactly: a recomputed
  log pi_old differs from log pi by float round-off, and KL-Cov's |log pi - log pi_old| has
  gradient sign(x) * grad log pi, full-size for any x != 0, so round-off would switch the
  penalty on with a random sign where the theory has it inert (THEORY.md T3.6). The metric
  "max_abs_log_ratio" still measures against the recomputed values (the round-off itself).

  Returns:
    (loss, (metrics, selected)): selected is the [rows, R] mask of tokens Clip-Cov or KL-Cov
    acted on (all False for the other methods).
  """
  tau, bound = config.temperature, config.ratio_bound
  raw = sampling.response_logits(model, params, batch.prompts, batch.responses, 1.0)
  logits = raw / tau
  log_prob = sampling.token_log_probs(logits, batch.responses)
  mask, adv = batch.response_mask, batch.advantages
  old = jnp.where(on_policy, jax.lax.stop_gradient(log_prob), batch.old_log_probs)
  args = (old, log_prob, adv, mask)
  common = dict(loss_agg_mode=config.loss_agg_mode, logits=logits)
  clip = dict(clip_ratio_low=control.clip_ratio_low, clip_ratio_high=control.clip_ratio_high)
  coef = control.coef_at(step)
  no_selection = jnp.zeros(log_prob.shape, bool)

  def ppo():
    loss, metrics = covrl.ppo_loss(*args, clip_ratio_c=config.dual_clip, **clip, **common)
    return loss, metrics, no_selection

  def clip_cov():
    # Select here rather than inside clip_cov_loss, to return the mask; the loss then uses it.
    # As in the reference, tokens the PPO clip already clips are not candidates.
    cov = covrl.token_covariance(log_prob, adv, mask)
    _, ratio = _losses._ratio(_losses._tokens(*args))
    _, clipped = _losses._clipped_surrogate(adv, ratio, control.clip_ratio_low,
                                            control.clip_ratio_high)
    selected = covrl.clip_cov_select(
        key, cov, mask, ratio=control.ratio, lb=control.clip_cov_lb, ub=control.clip_cov_ub,
        eligible=~clipped, max_ratio=bound,
    )
    loss, metrics = covrl.clip_cov_loss(None, *args, selected=selected, **clip, **common)
    return loss, metrics, selected

  def kl_cov():
    cov = covrl.token_covariance(log_prob, adv, mask)
    selected = covrl.kl_cov_select(cov, mask, ratio=control.ratio, max_ratio=bound)
    loss, metrics = covrl.kl_cov_loss(*args, kl_coef=coef, selected=selected, **common)
    return loss, metrics, selected

  branch = jnp.asarray([0, 0, 0, 1, 2], jnp.int32)[control.method]
  loss, metrics, selected = jax.lax.switch(branch, [ppo, clip_cov, kl_cov])
  bonus_coef = jnp.where(control.is_method("entropy"), coef, 0.0)
  bonus, _ = covrl.entropy_bonus_loss(raw, mask, coef=bonus_coef, temperature=tau,
                                      loss_agg_mode=config.loss_agg_mode)
  uses_coef = control.is_method("entropy") | control.is_method("kl_cov")
  metrics["control_coef"] = jnp.where(uses_coef, coef, 0.0)
  metrics["touched_frac"] = _touched_fraction(control, log_prob, old, batch, selected)
  log_ratio = jax.lax.stop_gradient(log_prob - batch.old_log_probs)
  metrics["max_abs_log_ratio"] = jnp.max(jnp.where(mask, jnp.abs(log_ratio), 0.0))
  return loss + bonus, (metrics, selected)


def _touched_fraction(control: ControlArrays, log_prob, old, batch: Batch, selected
                      ) -> jax.Array:
  """Fraction of valid tokens whose loss the control changes (the bonus: all of them)."""
  mask = batch.response_mask
  # Tokens the raised upper clip lets through: A > 0 and 1 + low < ratio <= 1 + high.
  ratio = jnp.exp(jax.lax.stop_gradient(log_prob - old))
  opened = (batch.advantages > 0) & (ratio > 1 + control.clip_ratio_low) & (
      ratio <= 1 + control.clip_ratio_high)
  flag = jnp.select(
      [control.is_method("entropy"), control.is_method("clip_higher"),
       control.is_method("clip_cov") | control.is_method("kl_cov")],
      [mask, opened, selected], jnp.zeros_like(mask))
  return covrl.masked_mean(flag.astype(jnp.float32), mask)

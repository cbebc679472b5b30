"""Entropy control as optax gradient transformations, for policies whose parameters are logits.

In a tabular policy the parameters are the logits z (shape [K] for a bandit, [S, K] for S
states), so a control method is literally a change of the logit update dz. These transforms take
the gradient of the policy loss and add the change each method makes to it; they compose with any
optax optimiser:

  opt = optax.chain(covrl.entropy_bonus(0.01), optax.sgd(0.1))
  opt = optax.chain(covrl.kl_cov(kl_coef=1.0, ratio=0.02), optax.sgd(0.1))

* `entropy_bonus(coef)` adds -coef * dH/dz at every state: dense and persistent.
* `kl_cov(...)` adds the gradient of kl_coef * |log pi - log pi_old| on the top-covariance
  samples (from the extra args), divided by the number of valid samples, as `covrl.kl_cov_loss`.
* `clip_cov(...)` removes the policy-gradient terms of the selected samples, as
  `covrl.clip_cov_loss` does: it assumes the incoming updates are the gradient of covrl's
  token-mean surrogate (`policy_gradient_loss` or `ppo_loss`) over the same samples.

Coefficients and ratios take a number or a schedule `count -> value` (covrl.schedules or optax);
the count lives in the state. All three work under `optax.inject_hyperparams`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from covrl import _checks, losses
from covrl import schedules as sch
from covrl import selection as sel
from covrl import softmax_entropy as ent
from covrl.covariance import masked_sum, token_covariance


class ControlState(NamedTuple):
  """State of a covrl transform: the number of updates applied so far."""

  count: jax.Array


def _value(x: Any, count: jax.Array) -> jax.Array:
  return jnp.asarray(x(count) if callable(x) else x)


def _check_coefficient(name: str, x: Any) -> None:
  if not callable(x):
    _checks.check_nonnegative(name, x)


def entropy_bonus(coef: Any, *, temperature: float = 1.0) -> optax.GradientTransformation:
  """Add the gradient of -coef * H(softmax(z / temperature)) for every logit array in params.

  Args:
    coef: bonus coefficient alpha >= 0, or a schedule `count -> alpha`.
    temperature: softmax temperature > 0.

  Returns:
    An optax GradientTransformation; `update` needs `params` (the logits).

  Example:
    >>> import jax.numpy as jnp, optax, covrl
    >>> opt = optax.chain(covrl.entropy_bonus(0.1), optax.sgd(1.0))
    >>> z = jnp.array([2.0, 0.0, -1.0]); state = opt.init(z)
    >>> updates, state = opt.update(jnp.zeros(3), state, z)
    >>> bool(covrl.entropy(z + updates) > covrl.entropy(z))
    True
  """
  _check_coefficient("coef", coef)
  _checks.check_positive("temperature", temperature)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("entropy_bonus needs params (the logits) in update().")
    alpha = _value(coef, state.count)

    def add(g, z):
      bonus = ent.entropy_grad(z / temperature) / temperature
      return (g - alpha * bonus).astype(g.dtype)

    return jax.tree.map(add, updates, params), ControlState(optax.safe_increment(state.count))

  return optax.GradientTransformation(_init, update_fn)


def _single_logits(params) -> jax.Array:
  leaves = jax.tree.leaves(params)
  if len(leaves) != 1 or leaves[0].ndim not in (1, 2):
    raise ValueError("covariance transforms need params to be one logit array, [K] or [S, K].")
  return leaves[0]


def _sample_log_prob(logits, actions, states):
  logp = jax.nn.log_softmax(_checks.upcast(logits), axis=-1)
  if logits.ndim == 1:
    return logp[actions]
  if states is None:
    raise ValueError("params of shape [S, K] need the sampled `states` as an extra arg.")
  return logp[states, actions]


def _samples(actions, advantages, response_mask):
  """Samples as one [1, N] row of tokens: (advantages, mask, flatten)."""
  actions = jnp.asarray(actions)
  advantages = _checks.check_float_array("advantages", advantages)
  if actions.shape != advantages.shape:
    raise ValueError(f"actions {actions.shape} and advantages {advantages.shape} must match.")
  if response_mask is None:
    response_mask = jnp.ones(actions.shape, bool)
  flatten = lambda x: jnp.reshape(x, (1, -1))
  mask = _checks.as_mask("response_mask", flatten(response_mask))
  return flatten(_checks.upcast(advantages)), mask, flatten


def _ratio_at(ratio: Any, count: jax.Array) -> Any:
  return ratio(count) if callable(ratio) else ratio


def _static_ratio_bound(ratio: Any, max_ratio: float | None) -> float | None:
  if not callable(ratio):
    _checks.check_fraction("ratio", ratio)
    return max_ratio
  if max_ratio is not None:
    return max_ratio
  decay = sch.as_power_decay(ratio)
  if decay is None:
    raise ValueError("a scheduled ratio needs max_ratio (a static bound on its values).")
  return decay.max_value


def _init(params) -> ControlState:
  del params
  return ControlState(jnp.zeros((), jnp.int32))


def kl_cov(
    kl_coef: Any = 1.0, *, ratio: Any = 2e-3, min_count: int = 1, max_ratio: float | None = None
) -> optax.GradientTransformationExtraArgs:
  """KL-Cov for a logit-parameterised policy, as a gradient transformation.

  Extra args of `update`: actions [N] (int), advantages [N], old_logits (same shape as params),
  optional response_mask [N] and, for [S, K] params, states [N]. The c_i of the samples are
  computed under the current logits; the selected samples add
  kl_coef * |log pi(a_i) - log pi_old(a_i)| / N_valid to the loss (derivative 0 where the two
  are equal, so the transform is inert on a purely on-policy step).

  Args:
    kl_coef: beta >= 0 or a schedule `count -> beta` (anneal it to 0 for THEORY.md T3.4).
    ratio: fraction of samples penalised, a number or a schedule (a scheduled ratio needs
      `max_ratio`, or a covrl PowerDecay, whose first value bounds it).
    min_count: least number of samples penalised (verl: 1).
    max_ratio: static bound on a scheduled ratio.
  """
  _check_coefficient("kl_coef", kl_coef)
  max_ratio = _static_ratio_bound(ratio, max_ratio)

  def update_fn(updates, state, params=None, *, actions, advantages, old_logits,
                response_mask=None, states=None, **extra):
    del extra
    logits = _single_logits(params)
    adv, mask, flat = _samples(actions, advantages, response_mask)
    old_lp = flat(_sample_log_prob(jnp.asarray(old_logits), actions, states))
    beta = _value(kl_coef, state.count)

    def penalty(z):
      lp = flat(_sample_log_prob(z, actions, states))
      cov = token_covariance(lp, adv, mask)
      chosen = sel.kl_cov_select(
          cov, mask, ratio=_ratio_at(ratio, state.count), min_count=min_count,
          max_ratio=max_ratio,
      )
      terms = losses.abs_zero_grad_at_zero(lp - jax.lax.stop_gradient(old_lp))
      return beta * masked_sum(terms, chosen) / jnp.maximum(jnp.sum(mask), 1)

    correction = jax.grad(penalty)(logits)
    new = jax.tree.map(lambda g: (g + correction).astype(g.dtype), updates)
    return new, ControlState(optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(_init, update_fn)


def clip_cov(
    *,
    ratio: Any = 2e-4,
    lb: float = 1.0,
    ub: float = 5.0,
    clip_ratio: float = 0.2,
    clip_ratio_low: float | None = None,
    clip_ratio_high: float | None = None,
    min_count: int = 1,
    max_ratio: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Clip-Cov for a logit-parameterised policy, as a gradient transformation.

  Extra args of `update`: key (PRNG key), actions [N], advantages [N], optional old_logits (the
  behaviour policy; on-policy when absent), response_mask [N] and, for [S, K] params, states [N].
  Selected samples (drawn from lb < c_i < ub among those the PPO clip leaves alone) have their
  term -A_i pi/pi_old removed from the token-mean surrogate whose gradient arrives as `updates`.

  Args:
    ratio: fraction of samples detached, a number or a schedule (see `kl_cov`).
    lb, ub: the open covariance band.
    clip_ratio, clip_ratio_low, clip_ratio_high: the PPO clip range of the base loss.
    min_count, max_ratio: as in `kl_cov`.
  """
  max_ratio = _static_ratio_bound(ratio, max_ratio)
  if not lb < ub:
    raise ValueError(f"Clip-Cov needs lb < ub, got lb={lb!r}, ub={ub!r}.")
  low = clip_ratio if clip_ratio_low is None else clip_ratio_low
  high = clip_ratio if clip_ratio_high is None else clip_ratio_high
  _checks.check_fraction("clip_ratio_low", low)
  _checks.check_nonnegative("clip_ratio_high", high)

  def update_fn(updates, state, params=None, *, key, actions, advantages, old_logits=None,
                response_mask=None, states=None, **extra):
    del extra
    logits = _single_logits(params)
    adv, mask, flat = _samples(actions, advantages, response_mask)
    behaviour = logits if old_logits is None else jnp.asarray(old_logits)
    old_lp = jax.lax.stop_gradient(flat(_sample_log_prob(behaviour, actions, states)))

    def log_ratio(z):
      return flat(_sample_log_prob(z, actions, states)) - old_lp

    r = jnp.exp(log_ratio(logits))
    clipped = -adv * jnp.clip(r, 1.0 - low, 1.0 + high) > -adv * r
    lp = flat(_sample_log_prob(logits, actions, states))
    chosen = sel.clip_cov_select(
        key, token_covariance(lp, adv, mask), mask, ratio=_ratio_at(ratio, state.count),
        lb=lb, ub=ub, eligible=~clipped, min_count=min_count, max_ratio=max_ratio,
    )

    def removed(z):
      return masked_sum(-adv * jnp.exp(log_ratio(z)), chosen) / jnp.maximum(jnp.sum(mask), 1)

    correction = jax.grad(removed)(logits)
    new = jax.tree.map(lambda g: (g - correction).astype(g.dtype), updates)
    return new, ControlState(optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(_init, update_fn)

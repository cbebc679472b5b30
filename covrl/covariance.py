"""The pooled per-token covariance that Clip-Cov and KL-Cov rank tokens by.

For a batch of sampled tokens i with log-probability log pi(y_i) and advantage A_i,

  c_i = (log pi(y_i) - mean_j log pi(y_j)) * (A_i - mean_j A_j),

with both means over the valid tokens of the batch (Cui et al. 2025, Eq. 10). It pools tokens from
different states, so it is a proxy for the within-state covariance Cov_pi(log pi, A) of
THEORY.md T1; `covrl.policy_covariance` computes the latter when the logits are known.

This is a batch-wide statistic: pass the whole [batch, time] array with its mask. Under
`shard_map`, pass `axis_name` and the means are taken over the global batch, so every device gets
the c_i of its own tokens exactly as a single device would compute them.

A weighted population (`weights`, one share per row: an enumerated set of responses, each row
standing for its probability) takes weighted means: the c_i of a batch in which row b occurs in
proportion to its weight (THEORY.md "T2/T3 in a network, exactly"; `covrl.policy_loss`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from covrl import _checks


def masked_sum(x: jax.Array, mask: jax.Array, axis_name: str | None = None,
               weight: jax.Array | None = None) -> jax.Array:
  """Sum of x over mask (masked entries never reach the sum, NaN included); with `weight`
  (broadcastable to x), the sum of weight * x."""
  if weight is not None:
    x = x * weight
  total = jnp.sum(jnp.where(mask, x, 0))
  return total if axis_name is None else lax.psum(total, axis_name)


def masked_mean(x: jax.Array, mask: jax.Array, axis_name: str | None = None,
                weight: jax.Array | None = None) -> jax.Array:
  """Mean of x over mask (weighted by `weight`, broadcastable to x, when given); 0 for an empty
  mask (not NaN).

  The unweighted mean divides by max(count, 1); the weighted one by the total weight (any
  positive total, however small), or gives 0 when that is 0.
  """
  if weight is None:
    count = masked_sum(jnp.ones_like(x), mask, axis_name)
    return masked_sum(x, mask, axis_name) / jnp.maximum(count, 1)
  total = masked_sum(jnp.ones_like(x), mask, axis_name, weight)
  return masked_sum(x, mask, axis_name, weight) / jnp.where(total > 0, total, 1.0)


def finite_tokens(response_mask: jax.Array, *arrays: jax.Array) -> jax.Array:
  """Valid tokens whose inputs are all finite (the ones statistics and selection may use)."""
  ok = response_mask
  for a in arrays:
    ok = ok & jnp.isfinite(a)
  return ok


def token_covariance(
    log_prob: jax.Array,
    advantages: jax.Array,
    response_mask: jax.Array,
    *,
    axis_name: str | None = None,
    weights: jax.Array | None = None,
) -> jax.Array:
  """Per-token centred product c_i of log-probabilities and advantages.

  Args:
    log_prob: [B, T] log pi(y_i) of the sampled tokens under the current policy.
    advantages: [B, T] advantages A_i.
    response_mask: [B, T] 0/1 or bool; 1 marks a valid response token.
    axis_name: a `shard_map` axis over which the batch is split; the means are then global.
    weights: optional [B] shares of a weighted population (finite, >= 0): the means are then
      weighted by row, and rows of weight 0 are left out as masked ones are.

  Returns:
    [B, T] c_i, in float32 or wider; 0 at masked tokens and at tokens whose log_prob or advantage
    is not finite (those are also left out of the means, so one NaN cannot poison the batch).

  Example:
    >>> import jax.numpy as jnp, covrl
    >>> c = covrl.token_covariance(jnp.log(jnp.array([[.5, .25]])), jnp.array([[1., -1.]]),
    ...                            jnp.ones((1, 2)))
    >>> [round(float(v), 4) for v in c[0]]
    [0.3466, 0.3466]
  """
  log_prob = _checks.check_float_array("log_prob", log_prob)
  advantages = _checks.check_float_array("advantages", advantages)
  _checks.check_same_shape(
      ("log_prob", "advantages", "response_mask"), (log_prob, advantages, response_mask), rank=2
  )
  mask = _checks.as_mask("response_mask", response_mask)
  dtype = _checks.result_dtype(log_prob, advantages)
  log_prob, advantages = log_prob.astype(dtype), advantages.astype(dtype)
  valid = finite_tokens(mask, log_prob, advantages)
  weight = None
  if weights is not None:
    weights = _checks.check_weights(weights, mask.shape[0]).astype(dtype)
    valid = valid & (weights[:, None] > 0)
    weight = jnp.where(valid, weights[:, None], 0.0)
  # Safe values at invalid positions keep NaN out of both the values and the gradients.
  log_prob = jnp.where(valid, log_prob, 0.0)
  advantages = jnp.where(valid, advantages, 0.0)
  count = None if weight is None else jnp.sum(weight)
  return centred_product(log_prob, advantages, valid, axis_name=axis_name, count=count,
                         weight=weight)


def centred_product(
    log_prob: jax.Array, advantages: jax.Array, valid: jax.Array, *, axis_name: str | None = None,
    count: jax.Array | None = None, weight: jax.Array | None = None,
) -> jax.Array:
  """c_i of `token_covariance` for inputs it has already cleaned (no checks, no masking).

  For callers (the losses) that hold a bool `valid` mask and arrays that are already 0 wherever
  `valid` is False: the means are then plain sums over the arrays, with no masked copy of
  each input, which is one full pass over [B, T] fewer per mean. With `weight` ([B, T] token
  weights, 0 wherever `valid` is False) the means are weighted and `count` is the total weight.
  """
  if count is None:  # this device's number (or weight) of valid tokens
    count = jnp.sum(valid, dtype=log_prob.dtype) if weight is None else jnp.sum(weight)
  if weight is None:
    sums = jnp.stack([jnp.sum(lax.stop_gradient(log_prob)), jnp.sum(advantages)])
  else:
    sums = jnp.stack([jnp.sum(weight * lax.stop_gradient(log_prob)),
                      jnp.sum(weight * advantages)])
  if axis_name is not None:
    count, sums = lax.psum((count, sums), axis_name)
  if weight is None:
    means = sums / jnp.maximum(count, 1)
  else:  # a total weight may be any positive number (probabilities sum to 1)
    means = sums / jnp.where(count > 0, count, 1.0)
  return jnp.where(valid, (log_prob - means[0]) * (advantages - means[1]), 0.0)

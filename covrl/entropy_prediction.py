"""Pooled entropy and its predicted change under a candidate update: what entropy controllers read.

A controller (covrl.controllers) tracks one number, the pooled entropy of many contexts (bandit
states weighted by their probabilities, or the valid token positions of a [B, T] batch), and
predicts how one candidate update moves it, from THEORY.md T1 applied per context::

  H = sum_s w_s H(pi_s) / sum_s w_s,
  dH ~= sum_s w_s dH_s / sum_s w_s,  dH_s = -Cov_{pi_s}(log pi_s, dz_s)            (first order)
                                          - 1/2 [Var(dz_s) + Cov(log pi_s, u_s^2)]  (second order)

For a network the logit change of a parameter update is linearised, dz ~= J dtheta, with one
`jax.jvp` (`linearized_logit_update`; T1.7: accurate to O(`|dtheta|^2`), as the predictor itself).

Batch-wide sums: under `shard_map`, pass `axis_name` and the sums are global (psum), so every
device gets the statistics of the whole batch; under plain jit on globally sharded arrays the
sums are global already.

References:
  G. Cui et al., The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models,
  arXiv:2505.22617 (2025), Lemma 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from covrl import _checks
from covrl import softmax_entropy as ent


def _weights(weights: Any, shape: tuple[int, ...], dtype) -> jax.Array:
  if weights is None:
    return jnp.ones(shape, dtype)
  w = jnp.asarray(weights)
  if w.shape != shape:
    raise ValueError(f"weights must have the contexts' shape {shape}, got {w.shape}.")
  if w.dtype == jnp.bool_:
    return w.astype(dtype)
  if _checks.is_concrete(w):
    with jax.ensure_compile_time_eval():  # one scalar to the host, also under an outer jit
      negative = bool(jnp.any(w < 0))
    if negative:
      raise ValueError("weights must be >= 0.")
  return w.astype(dtype)


def _weighted_mean(values, w, axis_name):
  num, den = jnp.sum(jnp.where(w > 0, values * w, 0.0)), jnp.sum(w)
  if axis_name is not None:
    num, den = jax.lax.psum((num, den), axis_name)
  return num / jnp.where(den > 0, den, 1.0)


def pooled_entropy(logits: jax.Array, weights: Any = None, *,
                   axis_name: str | None = None) -> jax.Array:
  """Weighted mean entropy over contexts: sum_s w_s H(softmax(z_s)) / sum_s w_s.

  Args:
    logits: [..., V] logits of the contexts (bandit states, or token positions [B, T, V]).
    weights: [...] weights >= 0 (state probabilities, or a response mask); all 1 when None.
    axis_name: a `shard_map` axis over which the contexts are split; the mean is then global.

  Returns:
    [] the pooled entropy (what the controllers track).
  """
  h = ent.entropy(logits)  # checks the logits (once)
  return _weighted_mean(h, _weights(weights, h.shape, h.dtype), axis_name)


def pooled_entropy_change(logits: jax.Array, logit_update: jax.Array, weights: Any = None, *,
                          order: int = 1, axis_name: str | None = None) -> jax.Array:
  """Predicted change of `pooled_entropy` under the logit update dz, per context then pooled.

  Per context s the first-order change is -Cov_{pi_s}(log pi_s, dz_s) and the second-order one
  adds -1/2 [Var_{pi_s}(dz_s) + Cov_{pi_s}(log pi_s, u_s^2)] (THEORY.md T1.2, T1.4); the
  pooled prediction is their w-weighted mean. Linear in dz at first order.

  Args:
    logits: [..., V] current logits.
    logit_update: [..., V] candidate logit update dz.
    weights: [...] weights >= 0, as in `pooled_entropy`.
    order: 1 or 2.
    axis_name: `shard_map` axis over which the contexts are split (global mean).

  Returns:
    [] predicted change of the pooled entropy.
  """
  if order not in (1, 2):
    raise ValueError(f"order must be 1 or 2, got {order!r}.")
  if jnp.shape(logit_update) != jnp.shape(logits):
    raise ValueError(f"logit_update {jnp.shape(logit_update)} must have the shape of logits "
                     f"{jnp.shape(logits)}.")
  change = (ent.entropy_change_first_order if order == 1
            else ent.entropy_change_second_order)
  per_context = change(logits, logit_update)  # checks the logits (once)
  return _weighted_mean(per_context, _weights(weights, per_context.shape, per_context.dtype),
                        axis_name)


def linearized_logit_update(logits_fn: Callable[[Any], jax.Array], params: Any,
                            param_update: Any) -> tuple[jax.Array, jax.Array]:
  """(logits, J dtheta): the logits and their first-order change under a parameter update.

  One `jax.jvp` of `logits_fn` at `params` in the direction `param_update` (a pytree like
  params), so dz ~= J dtheta costs about one forward pass in forward mode. THEORY.md T1.7:
  predicting from the linearised logit change is accurate to O(`|dtheta|^2`), like the first-order
  predictor itself.

  Args:
    logits_fn: params -> logits [..., V].
    params: the current parameters.
    param_update: the candidate update dtheta (same structure as params).

  Returns:
    (logits, dz), both [..., V].
  """
  return jax.jvp(logits_fn, (params,), (param_update,))

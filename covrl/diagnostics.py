"""Measurements that say whether a batch is in the regime where covariance control matters.

Cui et al.'s argument for Clip-Cov and KL-Cov rests on three conditions that a user can check on
their own batches (THEORY.md T5): the positive covariance c_i sits in a few tokens, the paper's
fractions select more than the floor of one token, and the policy-gradient push on entropy is
large against what an entropy bonus can offset. This module measures them, plus the sampling
metric that shows what a collapse costs::

  covariance_concentration  share of the batch's total positive c_i held by its top tokens
  tokens_in_band            how many valid tokens lie in Clip-Cov's open band (lb, ub)
  balance_coefficient       alpha* = <g_PG, grad H> / |grad H|^2: the bonus strength at which
                            entropy stops falling to first order under plain gradient descent
  pass_at_k                 the unbiased pass@k estimator of Chen et al. (2021)

The first two are batch-wide statistics: pass the whole [batch, time] array with its mask
(under jit the arrays may be sharded; the reductions are global). The counts follow the
selection rule of `covrl.kl_cov_select`, max(floor(fraction * N_valid), 1), so "the top 0.2%"
holds exactly the tokens KL-Cov with k = 2e-3 would pick.

References:
  Cui et al., The Entropy Mechanism of RL for Reasoning LMs, arXiv:2505.22617 (2025).
  Chen et al., Evaluating Large Language Models Trained on Code, arXiv:2107.03374 (2021).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from covrl import _checks
from covrl.covariance import finite_tokens
from covrl.selection import selection_count


def _tree_vdot(a: Any, b: Any) -> jax.Array:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  if jax.tree.structure(a) != jax.tree.structure(b):
    raise ValueError("pg_grad and entropy_grad must be pytrees of the same structure.")
  if not leaves_a:
    raise ValueError("the gradients have no leaves.")
  dtype = _checks.result_dtype(*leaves_a, *leaves_b)
  total = jnp.zeros((), dtype)
  for x, y in zip(leaves_a, leaves_b):
    if jnp.shape(x) != jnp.shape(y):
      raise ValueError(f"gradient leaves differ in shape: {jnp.shape(x)} vs {jnp.shape(y)}.")
    total = total + jnp.vdot(jnp.asarray(x, dtype), jnp.asarray(y, dtype))
  return total


def balance_coefficient(pg_grad: Any, entropy_grad: Any) -> jax.Array:
  """alpha* = ``<g_PG, grad H> / |grad H|^2``: the bonus that stops entropy falling, to first order.

  Conventions. `pg_grad` is g_PG = grad_theta L_PG, the gradient of the policy loss being
  *minimised* (plain gradient descent steps by -eta g_PG). `entropy_grad` is grad_theta H of the
  entropy the bonus rewards, with the same aggregation as the bonus (covrl's entropy bonus loss
  is -alpha H, so its gradient is g_bonus = -grad H). The update with the bonus is
  -eta (g_PG + alpha g_bonus), and the entropy changes, to first order in eta, by::

    dH = <grad H, -eta (g_PG - alpha grad H)> = -eta (<g_PG, grad H> - alpha |grad H|^2),

  which is 0 at alpha = alpha*. Positive alpha* means the policy gradient lowers entropy and a
  bonus of that strength offsets it; a bonus above alpha* raises entropy (to first order). Under
  Adam or gradient clipping the update is not -eta g, so alpha* describes plain gradient descent
  (global-norm clipping rescales both terms alike and leaves it unchanged).

  Args:
    pg_grad: pytree of arrays, the policy loss's gradient.
    entropy_grad: pytree of the same structure, the gradient of the rewarded entropy.

  Returns:
    scalar alpha* (float32, or wider for wider inputs); 0 when grad H = 0 (then no bonus
    changes entropy to first order).

  Example:
    >>> import jax.numpy as jnp, covrl
    >>> g_pg, g_h = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([-2.0, 0.0])}
    >>> float(covrl.diagnostics.balance_coefficient(g_pg, g_h))
    -0.5
  """
  num = _tree_vdot(pg_grad, entropy_grad)
  den = _tree_vdot(entropy_grad, entropy_grad)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
  fractions = tuple(float(f) for f in np.atleast_1d(np.asarray(fractions, np.float64)))
  if not fractions:
    raise ValueError("fractions must not be empty.")
  for f in fractions:
    _checks.check_fraction("fractions", f, allow_zero=False)
  return fractions


def covariance_concentration(cov: jax.Array, response_mask: jax.Array,
                             fractions: Sequence[float] = (0.002, 0.02)) -> jax.Array:
  """Share of the total positive covariance held by the top fraction of valid tokens.

  For each fraction f, the top n_f = max(floor(f N), 1) valid tokens by c_i (N valid tokens with
  finite c_i; ties to the lower flat index, as `covrl.kl_cov_select`) hold

    share_f = sum_{i in top n_f} max(c_i, 0) / sum_{valid i} max(c_i, 0).

  A batch whose covariance sits in its forking tokens has share_0.002 near 1; one where every
  token carries the same c_i has share_f = n_f / N. Batch-wide: pass the whole [B, T] array.

  Args:
    cov: [B, T] per-token covariance (`covrl.token_covariance`).
    response_mask: [B, T] 0/1 or bool.
    fractions: fractions of the valid tokens, each in (0, 1] (static Python floats).

  Returns:
    [len(fractions)] shares in [0, 1] (float32, or wider for a wider `cov`); 0 when no valid
    c_i is positive.

  Example:
    >>> import jax.numpy as jnp, covrl
    >>> cov = jnp.array([[4.0, 1.0, -2.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0]])
    >>> covrl.diagnostics.covariance_concentration(cov, jnp.ones_like(cov), (0.1, 0.2)).tolist()
    [0.6666666865348816, 0.8333333134651184]
  """
  fractions = _check_fractions(fractions)
  _checks.check_same_shape(("cov", "response_mask"), (cov, response_mask), rank=2)
  mask = _checks.as_mask("response_mask", response_mask)
  cov = jax.lax.stop_gradient(_checks.upcast(_checks.check_float_array("cov", cov)))
  valid = finite_tokens(mask, cov)
  num_valid = jnp.sum(valid, dtype=jnp.int32)
  positive = jnp.where(valid, jnp.maximum(cov, 0.0), 0.0).reshape(-1)
  # Stable descending order: a tie keeps the lower flat index first (KL-Cov's rule).
  order = jnp.argsort(-jnp.where(valid, cov, -jnp.inf).reshape(-1), stable=True)
  running = jnp.cumsum(positive[order])
  total = running[-1]
  shares = []
  for f in fractions:
    count, _ = selection_count(f, num_valid, capacity=cov.size)
    held = running[jnp.clip(count - 1, 0, cov.size - 1)]
    shares.append(jnp.where(total > 0, held / jnp.where(total > 0, total, 1.0), 0.0))
  return jnp.stack(shares)


def tokens_in_band(cov: jax.Array, response_mask: jax.Array, lb: float | jax.Array,
                   ub: float | jax.Array) -> jax.Array:
  """Number of valid tokens with lb < c_i < ub (Clip-Cov's open band, before its draw).

  Args:
    cov: [B, T] per-token covariance.
    response_mask: [B, T] 0/1 or bool.
    lb, ub: the band's bounds (numbers or traced scalars).

  Returns:
    int32 scalar count (over the whole array).
  """
  _checks.check_same_shape(("cov", "response_mask"), (cov, response_mask), rank=2)
  mask = _checks.as_mask("response_mask", response_mask)
  cov = _checks.upcast(_checks.check_float_array("cov", cov))
  valid = finite_tokens(mask, cov)
  return jnp.sum(valid & (cov > lb) & (cov < ub), dtype=jnp.int32)


def pass_at_k(correct: jax.Array, k: int) -> jax.Array:
  """Unbiased pass@k per prompt from n samples each: 1 - C(n - c, k) / C(n, k).

  With n samples of a prompt of which c are correct, the probability that k of them drawn
  without replacement include a correct one. Computed as 1 - prod_{i = n - c + 1}^{n} (1 - k / i),
  Chen et al.'s numerically stable form (no large binomials).

  Args:
    correct: [prompts, n] 0/1 or bool, sample j of prompt p correct.
    k: static int, 1 <= k <= n.

  Returns:
    [prompts] float32 estimates (their mean is the benchmark's pass@k).

  Example:
    >>> import jax.numpy as jnp, covrl
    >>> covrl.diagnostics.pass_at_k(jnp.array([[1, 0, 0, 0], [0, 0, 0, 0]]), 2).tolist()
    [0.5, 0.0]
  """
  correct = jnp.asarray(correct)
  if correct.ndim != 2:
    raise ValueError(f"correct must be [prompts, samples], got shape {correct.shape}.")
  n = correct.shape[1]
  if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n:
    raise ValueError(f"k must be an int in [1, {n}] (the samples per prompt), got {k!r}.")
  c = jnp.sum(correct.astype(bool), axis=1, dtype=jnp.int32)
  i = jnp.arange(1, n + 1, dtype=jnp.float32)
  factors = jnp.where(i[None, :] > (n - c)[:, None], 1.0 - k / i[None, :], 1.0)
  return (1.0 - jnp.prod(factors, axis=1)).astype(jnp.float32)

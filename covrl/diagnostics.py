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

Bad input follows the library's rule: shapes, dtypes and static arguments are checked before
tracing, and values (a mask or `correct` that is not 0/1, a NaN gradient, a NaN bound) raise a
ValueError naming the argument when they are concrete; under jit each function returns the
finite result its docstring names (an empty band, an all-masked share of 0), except
`balance_coefficient`, whose alpha* is NaN for a non-finite gradient because it is not defined
there. An empty batch (B = 0 or T = 0) is an all-masked one. Non-finite c_i are left out, as
the selections leave them out.

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


def _grad_leaves(name: str, tree: Any) -> list[tuple[str, jax.Array]]:
  """(path, array) for each leaf of one gradient pytree; TypeError for a leaf that is not float."""
  out = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    where = jax.tree_util.keystr(path) or "(the root)"
    try:
      x = jnp.asarray(leaf)
    except TypeError as e:
      raise TypeError(f"{name} leaf {where} is not a numeric array: {type(leaf).__name__}.") from e
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must hold floating arrays; leaf {where} has dtype {x.dtype}.")
    out.append((where, x))
  return out


def _check_finite_leaves(name: str, leaves: list[tuple[str, jax.Array]]) -> None:
  """Raise ValueError if a concrete leaf holds a NaN or inf (a traced one: see the caller)."""
  concrete = [(where, x) for where, x in leaves if _checks.is_concrete(x)]
  if not concrete:
    return
  with jax.ensure_compile_time_eval():  # also when a jit closes over concrete gradients
    counts = [jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for _, x in concrete]
    total = int(sum(counts))  # one scalar to the host; the leaf's name only when it fails
  if total:
    first = next(where for (where, _), c in zip(concrete, counts) if int(c))
    raise ValueError(f"{name} has {total} non-finite value(s) (the first in leaf {first}); "
                     "alpha* is not defined for such a gradient.")


def _max_abs(leaves: list[jax.Array], dtype: jnp.dtype) -> jax.Array:
  """Largest absolute entry over all leaves: 0 with no entries, NaN if one is NaN, inf if one is
  inf."""
  m = jnp.zeros((), dtype)
  for x in leaves:
    if x.size:
      m = jnp.maximum(m, jnp.max(jnp.abs(x)).astype(dtype))  # jnp.maximum keeps a NaN
  return m


def _exponent(scale: jax.Array) -> jax.Array:
  """e with scale = m 2^e, 0.5 <= m < 1 (0 for a zero, NaN or inf scale).

  Scaling by 2^-e with `jnp.ldexp` is exact. Dividing by `scale` is not safe: on CPU, XLA gave
  3e38 / 3e38 = 0 in float32 (computed, it seems, as x * (1 / scale), with the subnormal
  1 / scale flushed to 0).
  """
  return jnp.frexp(jnp.where(jnp.isfinite(scale), scale, 0.0))[1]


def _scaled_vdot(a: list[jax.Array], ea: jax.Array, b: list[jax.Array], eb: jax.Array,
                 dtype: jnp.dtype) -> jax.Array:
  """<a 2^-ea, b 2^-eb> summed over matching leaves."""
  total = jnp.zeros((), dtype)
  for x, y in zip(a, b):
    total = total + jnp.vdot(jnp.ldexp(x.astype(dtype), -ea), jnp.ldexp(y.astype(dtype), -eb))
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

  Each gradient is scaled by a power of two that brings its largest absolute entry into
  [1/2, 1) before the dot products (exact; alpha* is linear in g_PG and in 1 / grad H, so the
  scales cancel): gradients of 1e-25 or 1e25 in float32 give alpha*, not 0 from an underflowed
  ``|grad H|^2`` or from an overflowed one. An alpha* beyond the dtype's range is inf or 0, as
  its value rounds.

  Bad input. The trees must match in structure and leaf shapes (ValueError), have at least one
  leaf (ValueError) and hold floating arrays (TypeError naming the argument and the leaf). A NaN
  or inf entry raises ValueError naming the argument when the gradients are concrete; under jit
  the result is NaN (alpha* is not defined there), never a number that looks like a balance.

  Args:
    pg_grad: pytree of floating arrays, the policy loss's gradient.
    entropy_grad: pytree of the same structure, the gradient of the rewarded entropy.

  Returns:
    scalar alpha* (float32, or wider for wider inputs); 0 when grad H = 0 exactly, including
    leaves with no entries (then no bonus changes entropy to first order); NaN under jit for a
    non-finite gradient.

  Example:
    >>> import jax.numpy as jnp, covrl
    >>> g_pg, g_h = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([-2.0, 0.0])}
    >>> float(covrl.diagnostics.balance_coefficient(g_pg, g_h))
    -0.5
  """
  if jax.tree.structure(pg_grad) != jax.tree.structure(entropy_grad):
    raise ValueError("pg_grad and entropy_grad must be pytrees of the same structure.")
  g = _grad_leaves("pg_grad", pg_grad)
  h = _grad_leaves("entropy_grad", entropy_grad)
  if not g:
    raise ValueError("pg_grad and entropy_grad have no leaves (no gradient to compare).")
  for (where, x), (_, y) in zip(g, h):
    if x.shape != y.shape:
      raise ValueError(f"gradient leaves differ in shape at {where}: pg_grad {x.shape} vs "
                       f"entropy_grad {y.shape}.")
  _check_finite_leaves("pg_grad", g)
  _check_finite_leaves("entropy_grad", h)
  g, h = [x for _, x in g], [y for _, y in h]
  dtype = _checks.result_dtype(*g, *h)
  g_scale, h_scale = _max_abs(g, dtype), _max_abs(h, dtype)
  g_exp, h_exp = _exponent(g_scale), _exponent(h_scale)
  num = _scaled_vdot(g, g_exp, h, h_exp, dtype)
  den = _scaled_vdot(h, h_exp, h, h_exp, dtype)  # >= 1/4 when grad H != 0 (its top entry >= 1/2)
  ratio = num / jnp.where(den > 0, den, 1.0)
  alpha = jnp.where(h_scale > 0, jnp.ldexp(ratio, g_exp - h_exp), 0.0)
  # A NaN or inf entry makes its tree's scale NaN or inf: under jit the answer is then NaN.
  return jnp.where(jnp.isfinite(g_scale) & jnp.isfinite(h_scale), alpha, jnp.nan).astype(dtype)


def _check_fractions(fractions: Any) -> tuple[float, ...]:
  """The fractions as Python floats, each in (0, 1]; TypeError unless static real numbers."""
  if any(isinstance(f, jax.core.Tracer) for f in jax.tree.leaves(fractions)):
    raise TypeError("fractions must be static Python floats (they fix the result's shape), got "
                    "a traced value; close over them or mark them static.")
  values = np.asarray(fractions)
  if values.dtype.kind not in "iuf":  # bool, complex, strings and objects are not fractions
    raise TypeError(f"fractions must be real numbers, got dtype {values.dtype}.")
  if values.ndim > 1:
    raise ValueError(f"fractions must be a number or a flat sequence, got shape {values.shape}.")
  values = tuple(float(f) for f in np.atleast_1d(values.astype(np.float64)))
  if not values:
    raise ValueError("fractions must not be empty.")
  for f in values:
    _checks.check_fraction("fractions", f, allow_zero=False)  # also refuses NaN and inf
  return values


def covariance_concentration(cov: jax.Array, response_mask: jax.Array,
                             fractions: Sequence[float] = (0.002, 0.02)) -> jax.Array:
  """Share of the total positive covariance held by the top fraction of valid tokens.

  For each fraction f, the top n_f = max(floor(f N), 1) valid tokens by c_i (N valid tokens with
  finite c_i; ties to the lower flat index, as `covrl.kl_cov_select`) hold

    share_f = sum_{i in top n_f} max(c_i, 0) / sum_{valid i} max(c_i, 0).

  A batch whose covariance sits in its forking tokens has share_0.002 near 1; one where every
  token carries the same c_i has share_f = n_f / N. Batch-wide: pass the whole [B, T] array.
  The positive parts are scaled by a power of two to at most 1 before they are summed (the
  shares are ratios), so c_i near the float32 limit give their shares, not inf / inf.

  Bad input. Shapes, dtypes and a concrete mask that is not 0/1 raise (ValueError / TypeError
  naming the argument); under jit any nonzero mask entry counts as valid, as elsewhere in covrl.
  A NaN or inf c_i at a valid position is left out, concrete or traced, exactly as KL-Cov leaves
  it out (it never selects one): it counts neither in N nor in the total. An empty batch
  (B = 0 or T = 0), an all-masked one and one without a finite valid c_i give 0 for every
  fraction, like a batch whose valid c_i are all <= 0.

  Args:
    cov: [B, T] per-token covariance (`covrl.token_covariance`), floating.
    response_mask: [B, T] 0/1 or bool.
    fractions: a fraction or a flat sequence of them, each in (0, 1] (static Python floats;
      TypeError for traced, bool or non-numeric ones, ValueError for one outside (0, 1] or NaN).

  Returns:
    [len(fractions)] shares in [0, 1] (float32, or wider for a wider `cov`); 0 when no valid
    c_i is positive (an empty or all-masked batch included).

  Example:
    >>> import jax.numpy as jnp, covrl
    >>> cov = jnp.array([[4.0, 1.0, -2.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0]])
    >>> covrl.diagnostics.covariance_concentration(cov, jnp.ones_like(cov), (0.1, 0.2)).tolist()
    [0.6666666865348816, 0.8333333134651184]
    >>> covrl.diagnostics.covariance_concentration(jnp.zeros((0, 8)), jnp.zeros((0, 8))).tolist()
    [0.0, 0.0]
  """
  fractions = _check_fractions(fractions)
  _checks.check_same_shape(("cov", "response_mask"), (cov, response_mask), rank=2)
  mask = _checks.as_mask("response_mask", response_mask)
  cov = jax.lax.stop_gradient(_checks.upcast(_checks.check_float_array("cov", cov)))
  if cov.size == 0:  # no token at all: the all-masked answer (the top-n lookup needs a token)
    return jnp.zeros((len(fractions),), cov.dtype)
  valid = finite_tokens(mask, cov)
  num_valid = jnp.sum(valid, dtype=jnp.int32)
  positive = jnp.where(valid, jnp.maximum(cov, 0.0), 0.0).reshape(-1)
  # Positive parts scaled by a power of two to at most 1 (exact): the running sum stays below N
  # and cannot overflow to inf.
  positive = jnp.ldexp(positive, -_exponent(jnp.max(positive)))
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


def _check_bound(name: str, value: Any) -> None:
  """A band bound: a real scalar (`_checks.number`: TypeError / ValueError naming it), not NaN
  when concrete."""
  v = _checks.number(name, value)
  if v is not None and np.isnan(v):
    raise ValueError(f"{name} must not be NaN.")


def tokens_in_band(cov: jax.Array, response_mask: jax.Array, lb: float | jax.Array,
                   ub: float | jax.Array) -> jax.Array:
  """Number of valid tokens with lb < c_i < ub (Clip-Cov's open band, before its draw).

  The candidates are those of `covrl.clip_cov_select`: valid tokens with a finite c_i strictly
  inside the band.

  Bad input. Shapes, dtypes and a concrete mask that is not 0/1 raise (ValueError / TypeError
  naming the argument); under jit any nonzero mask entry counts as valid. A NaN or inf c_i at a
  valid position is never in the band (Clip-Cov never draws it), concrete or traced. A bound
  must be a real scalar; a concrete NaN bound, or concrete bounds with lb >= ub, raise
  ValueError (Clip-Cov refuses the same band). An infinite bound is allowed: lb = -inf leaves the
  band open below, ub = +inf above. Under jit a NaN bound or lb >= ub makes the band empty: 0,
  the number of candidates Clip-Cov would have. An empty (B = 0 or T = 0) or all-masked batch
  gives 0.

  Args:
    cov: [B, T] per-token covariance, floating.
    response_mask: [B, T] 0/1 or bool.
    lb, ub: the band's bounds (real numbers or traced scalars), lb < ub.

  Returns:
    int32 scalar count (over the whole array).

  Example:
    >>> import jax.numpy as jnp, covrl
    >>> cov = jnp.array([[0.5, 1.0, 2.0, 7.0], [3.0, 4.0, jnp.nan, 5.0]])
    >>> int(covrl.diagnostics.tokens_in_band(cov, jnp.ones_like(cov), 1.0, 5.0))
    3
  """
  _checks.check_same_shape(("cov", "response_mask"), (cov, response_mask), rank=2)
  _check_bound("lb", lb)
  _check_bound("ub", ub)
  lbv, ubv = _checks.concrete_float(lb), _checks.concrete_float(ub)
  if lbv is not None and ubv is not None and not lbv < ubv:
    raise ValueError(f"tokens_in_band needs lb < ub (an open band), got lb={lbv!r}, ub={ubv!r}.")
  mask = _checks.as_mask("response_mask", response_mask)
  cov = _checks.upcast(_checks.check_float_array("cov", cov))
  valid = finite_tokens(mask, cov)
  return jnp.sum(valid & (cov > lb) & (cov < ub), dtype=jnp.int32)


def pass_at_k(correct: jax.Array, k: int) -> jax.Array:
  """Unbiased pass@k per prompt from n samples each: 1 - C(n - c, k) / C(n, k).

  With n samples of a prompt of which c are correct, the probability that k of them drawn
  without replacement include a correct one. Computed as 1 - prod_{i = n - c + 1}^{n} (1 - k / i),
  Chen et al.'s numerically stable form (no large binomials).

  Bad input. `correct` must be [prompts, n] with n >= 1 (ValueError otherwise) and of a bool,
  integer or float dtype (TypeError otherwise); a concrete entry other than 0 and 1 (2, 0.5, -1,
  NaN) raises ValueError naming `correct`. Under jit any nonzero entry (NaN included) counts as
  correct, as a mask's does. `k` must be a static int (not a bool, a float or a traced value) in
  [1, n]; ValueError otherwise. Zero prompts give an empty [0] array.

  Args:
    correct: [prompts, n] 0/1 or bool (int or float 0/1 too), sample j of prompt p correct.
    k: static int, 1 <= k <= n.

  Returns:
    [prompts] float32 estimates in [0, 1] (their mean is the benchmark's pass@k).

  Example:
    >>> import jax.numpy as jnp, covrl
    >>> covrl.diagnostics.pass_at_k(jnp.array([[1, 0, 0, 0], [0, 0, 0, 0]]), 2).tolist()
    [0.5, 0.0]
  """
  correct = jnp.asarray(correct)
  if correct.ndim != 2:
    raise ValueError(f"correct must be [prompts, samples], got shape {correct.shape}.")
  n = correct.shape[1]
  if n == 0:
    raise ValueError(f"correct has no samples per prompt (shape {correct.shape}); pass@k needs "
                     "n >= 1.")
  if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n:
    raise ValueError(f"k must be a static int in [1, {n}] (the samples per prompt), got {k!r}.")
  k = int(k)
  hit = _checks.as_mask("correct", correct)
  c = jnp.sum(hit, axis=1, dtype=jnp.int32)
  i = jnp.arange(1, n + 1, dtype=jnp.float32)
  factors = jnp.where(i[None, :] > (n - c)[:, None], 1.0 - k / i[None, :], 1.0)
  return (1.0 - jnp.prod(factors, axis=1)).astype(jnp.float32)

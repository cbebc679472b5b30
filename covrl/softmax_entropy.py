"""Math on logits: entropy, its gradient, and how a logit update changes it.

Everything here acts on the last axis of `logits`, the vocabulary; leading axes are batch axes.
The policy is pi = softmax(z). Entries of z equal to -inf are allowed (a masked vocabulary): they
get probability 0 and contribute 0 to every value and every gradient. Inputs in bfloat16 or
float16 are computed in float32; float64 stays float64.

Undefined policies: a row with a NaN or +inf logit, or with every entry -inf, raises ValueError
when the logits are concrete; under jit every value computed from it is NaN (never a plausible
finite number: a NaN logit does not count as probability 0), so the losses leave such tokens out
and count them in `nonfinite_tokens`. Likewise a NaN or inf logit update (`logit_update`) at an
entry of positive probability raises when concrete and gives a NaN change under jit.

The identities implemented (THEORY.md T1; proofs/T1_entropy_covariance.md)::

  dH/dz_b = -pi_b (log pi_b + H)
  H(z + dz) - H(z) = -Cov_pi(log pi, dz) + O(|dz|^2)                               (first order)
                   = -Cov_pi(log pi, dz) - 1/2 [Var_pi(dz) + Cov_pi(log pi, u^2)] + O(|dz|^3),
                     u = dz - E_pi dz                                               (second order)
                   = -int_0^1 Cov_{pi_t}(log pi_t, dz) dt,  pi_t = softmax(z + t dz)  (exact)

References:
  Cui et al., The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models,
  arXiv:2505.22617 (2025), Lemma 1.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from covrl import _checks


def defined_rows(logits: jax.Array) -> jax.Array:
  """[...] bool: the rows of logits whose policy softmax(z) is defined.

  A row is undefined when it holds a NaN or a +inf, or when every entry is -inf (no support).
  One reduction: the row maximum is finite exactly then (a NaN propagates through the max).
  """
  return jnp.isfinite(jnp.max(logits, axis=-1))


def _log_policy(logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Returns (log pi, pi, support) with support = pi > 0 in the sense of finite log pi.

  Rows whose policy is undefined (`defined_rows`) get NaN in log pi and pi, so that every value
  computed from them (entropy, covariances, changes) is NaN rather than a plausible number: a
  NaN logit would otherwise fail the support test and count as probability 0.
  """
  logp = jax.nn.log_softmax(logits, axis=-1)
  support = logp > -jnp.inf
  # The double `where`: masked entries must not reach the multiplication with -inf even in the
  # backward pass, where 0 * inf would turn into a NaN gradient.
  safe_logp = jnp.where(support, logp, 0.0)
  p = jnp.where(support, jnp.exp(safe_logp), 0.0)
  undefined = ~defined_rows(logits)[..., None]
  return (jnp.where(undefined, jnp.nan, safe_logp), jnp.where(undefined, jnp.nan, p),
          support | undefined)


def _expect(p: jax.Array, x: jax.Array, support: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(support, p * jnp.where(support, x, 0.0), 0.0), axis=-1)


@jax.custom_jvp
def _entropy(logits: jax.Array) -> jax.Array:
  logp, p, support = _log_policy(logits)
  return -_expect(p, logp, support)


@_entropy.defjvp
def _entropy_jvp(primals, tangents):
  (logits,), (dz,) = primals, tangents
  # One pass over the vocabulary gives the value and the closed-form gradient together.
  logp, p, support = _log_policy(logits)
  h = -_expect(p, logp, support)
  grad = jnp.where(support, -p * (logp + h[..., None]), 0.0)
  return h, jnp.sum(jnp.where(support, grad * dz, 0.0), axis=-1)


def _entropy_grad(logits: jax.Array) -> jax.Array:
  logp, p, support = _log_policy(logits)
  h = -_expect(p, logp, support)
  return jnp.where(support, -p * (logp + h[..., None]), 0.0)


@jax.custom_vjp
def entropy_reverse_only(logits: jax.Array) -> jax.Array:
  """`entropy` for hot reverse-mode paths (losses): same values and gradients, less memory.

  The custom JVP of `entropy` makes reverse mode save the [..., V] gradient as a residual; this
  custom VJP saves only the entropies and recomputes the gradient in one fused pass from the
  logits, which the caller holds anyway. For [B, T, V] logits that is one full-size buffer
  fewer in each direction (1.5-2x faster fwd+bwd on CPU). It supports reverse mode only (no
  jax.jvp / jacfwd); use `entropy` for those. No input checks: callers check.
  """
  return _entropy(logits)


def _entropy_reverse_fwd(logits):
  h = _entropy(logits)
  return h, (logits, h)


def _entropy_reverse_bwd(residuals, g):
  logits, h = residuals
  logp, p, support = _log_policy(logits)
  # A zero cotangent gives a zero gradient even on an undefined row (no NaN * 0).
  grad = jnp.where(support, -p * (logp + h[..., None]), 0.0) * g[..., None]
  return (jnp.where((g != 0)[..., None], grad, 0.0),)


entropy_reverse_only.defvjp(_entropy_reverse_fwd, _entropy_reverse_bwd)


def check_logits(logits) -> jax.Array:
  """Check logits (float dtype, a vocabulary axis, no NaN / +inf / all -inf rows when concrete)
  and return them upcast to at least float32."""
  logits = _checks.check_float_array("logits", logits)
  if logits.ndim < 1 or logits.shape[-1] < 1:
    raise ValueError(f"logits must have a vocabulary axis of size >= 1, got shape {logits.shape}.")
  if _checks.is_concrete(logits) and logits.size:
    # Reduced on the logits' device: two flags come back to the host, never the array (now,
    # also when an outer jit closes over the concrete logits).
    with jax.ensure_compile_time_eval():
      flags = jnp.stack([jnp.any(jnp.isnan(logits) | jnp.isposinf(logits)),
                         jnp.any(jnp.all(jnp.isneginf(logits), axis=-1))])
      has_nan, empty_row = (bool(f) for f in flags.tolist())
    if has_nan:
      raise ValueError("logits contain NaN or +inf; only -inf (a masked vocabulary entry) is "
                       "allowed.")
    if empty_row:
      raise ValueError("a row of logits is entirely -inf: its policy is undefined.")
  return _checks.upcast(logits)


def entropy(logits: jax.Array) -> jax.Array:
  """Shannon entropy of softmax(logits) over the last axis, in nats.

  H(pi) = -sum_a pi_a log pi_a. Stable for large logits; -inf entries count as probability 0.
  Its gradient is the closed form of `entropy_grad` (a custom JVP), so it is exact and free of
  NaN at probability-zero entries, and it can be differentiated again.

  Args:
    logits: [..., V] floating array.

  Returns:
    [...] entropy, in float32 or wider.

  Example:
    >>> import jax.numpy as jnp, covrl
    >>> round(float(covrl.entropy(jnp.zeros(4))), 4)  # log 4
    1.3863
  """
  return _entropy(check_logits(logits))


def entropy_grad(logits: jax.Array) -> jax.Array:
  """Closed-form gradient of `entropy` with respect to the logits.

  dH/dz_b = -pi_b (log pi_b + H). It sums to zero over the vocabulary (a shift of the logits does
  not change the entropy) and vanishes only at the uniform policy over the support.

  Args:
    logits: [..., V] floating array.

  Returns:
    [..., V] gradient.
  """
  return _entropy_grad(check_logits(logits))


def policy_covariance(logits: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
  """Within-state covariance Cov_pi(x, y) = E_pi[(x - E_pi x)(y - E_pi y)], pi = softmax(logits).

  Args:
    logits: [..., V].
    x, y: [..., V] per-action values (broadcastable to logits). Entries where pi = 0 are ignored,
      so x may be log pi itself, -inf included.

  Returns:
    [...] covariance.
  """
  logits = check_logits(logits)
  return _covariance(logits, x, y)


def _covariance(logits: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
  _, p, support = _log_policy(logits)
  x = jnp.broadcast_to(jnp.asarray(x, logits.dtype), logits.shape)
  y = jnp.broadcast_to(jnp.asarray(y, logits.dtype), logits.shape)
  xc = jnp.where(support, x, 0.0) - _expect(p, x, support)[..., None]
  yc = jnp.where(support, y, 0.0) - _expect(p, y, support)[..., None]
  return _expect(p, xc * yc, support)


def check_logit_update(logits: jax.Array, logit_update) -> jax.Array:
  """Check a logit update (float, broadcastable to logits; finite where logits are > -inf, when
  concrete) and return it broadcast to logits in their dtype."""
  dz = jnp.asarray(logit_update)
  if not (jnp.issubdtype(dz.dtype, jnp.floating) or jnp.issubdtype(dz.dtype, jnp.integer)):
    raise TypeError(f"logit_update must have a real dtype, got {dz.dtype}.")
  try:
    dz = jnp.broadcast_to(dz.astype(logits.dtype), logits.shape)
  except ValueError:
    raise ValueError(f"logit_update {dz.shape} must broadcast to logits {logits.shape}.") from None
  support = logits > -jnp.inf
  _checks.check_finite_where("logit_update", dz, support)
  # Under jit a NaN or inf update at a supported entry becomes NaN, so every form of the change
  # is NaN there (a -inf update would otherwise give a finite exact change but a NaN first-order
  # one); entries of probability 0 keep probability 0 whatever their update.
  return jnp.where(support, jnp.where(jnp.isfinite(dz), dz, jnp.nan), 0.0)


def _first_order(logits: jax.Array, dz: jax.Array) -> jax.Array:
  logp, _, _ = _log_policy(logits)
  return -_covariance(logits, logp, dz)


def entropy_change(logits: jax.Array, logit_update: jax.Array) -> jax.Array:
  """Exact change H(softmax(z + dz)) - H(softmax(z)).

  Computed as a difference of entropies, so in float32 it loses relative accuracy when dz is
  small; use float64 to study the small-step limit.
  """
  logits = check_logits(logits)
  dz = check_logit_update(logits, logit_update)
  return _entropy(logits + dz) - _entropy(logits)


def entropy_change_first_order(logits: jax.Array, logit_update: jax.Array) -> jax.Array:
  """First-order entropy change -Cov_pi(log pi, dz) (Cui et al. 2025, Lemma 1)."""
  logits = check_logits(logits)
  return _first_order(logits, check_logit_update(logits, logit_update))


def entropy_change_second_order(logits: jax.Array, logit_update: jax.Array) -> jax.Array:
  """Second-order entropy change.

  -Cov_pi(log pi, dz) - 1/2 [Var_pi(dz) + Cov_pi(log pi, (dz - E_pi dz)^2)]; the residual is
  O(`|dz|^3`). Derived in proofs/T1_entropy_covariance.md.
  """
  logits = check_logits(logits)
  dz = check_logit_update(logits, logit_update)
  logp, p, support = _log_policy(logits)
  centred = jnp.where(support, dz, 0.0) - _expect(p, dz, support)[..., None]
  first = -_covariance(logits, logp, dz)
  var = _expect(p, centred**2, support)
  skew = _covariance(logits, logp, centred**2)
  return first - 0.5 * (var + skew)


class ScoreTerms(NamedTuple):
  """Per-position terms of the first-order entropy change along score directions.

  Attributes:
    entropy: [...] H.
    spread: [...] sum_a pi_a^2 (log pi_a + H) (the part of Cov_pi(log pi, e_y - pi) that does
      not depend on the sampled token y).
    bonus_gain: [...] sum_a pi_a^2 (log pi_a + H)^2 = `|grad_z H|^2` (the bonus's own change).
  """

  entropy: jax.Array
  spread: jax.Array
  bonus_gain: jax.Array


def score_terms(logits: jax.Array) -> ScoreTerms:
  """`ScoreTerms` of softmax(logits): the entropy and the score terms, from the same logits.

  The moments m_k = sum_a pi_a^2 (log pi_a)^k need no H (no second pass after H's):
  spread = m_1 + H m_0 and bonus_gain = m_2 + 2 H m_1 + H^2 m_0. At vocabulary scale each sum
  costs about what the entropy does (measured on CPU, V = 16384).
  """
  logits = check_logits(logits)
  logp, p, support = _log_policy(logits)
  h = -_expect(p, logp, support)
  # Separate sums, so that under jit an unused one (bonus_gain without a bonus) is dropped.
  m0, m1, m2 = (_expect(p, p * logp**k, support) for k in (0, 1, 2))
  return ScoreTerms(h, m1 + h * m0, jnp.maximum(m2 + 2.0 * h * m1 + h * h * m0, 0.0))


def score_step_entropy_change(logits: jax.Array | ScoreTerms, log_prob: jax.Array,
                              slope: jax.Array, bonus: jax.Array | float = 0.0) -> jax.Array:
  """First-order entropy change of a token loss's logit step, at each position (T1.2).

  A token loss l(log pi(y), H) with slope g = dl / d log pi(y) (y the sampled token) and bonus
  -beta H has the logit gradient g (e_y - pi) - beta grad H; the unit step down it,
  dz = -g (e_y - pi) + beta grad H, changes the entropy to first order by::

    -Cov_pi(log pi, dz) = g [pi_y (log pi_y + H) - sum_a pi_a^2 (log pi_a + H)]
                          + beta sum_a pi_a^2 (log pi_a + H)^2,

  using dH/dz_a = -pi_a (log pi_a + H). The sampled token enters only through its probability,
  so the token ids are not needed. STEER's predictor keeps only the first term's e_y part.

  Args:
    logits: [..., V] logits (those the log-probabilities are of: tempered, if sampling was), or
      their `score_terms` computed already.
    log_prob: [...] log pi(y) of the sampled token at each position.
    slope: [...] g, the token loss's derivative with respect to log pi(y).
    bonus: beta >= 0, the entropy bonus's coefficient per token (a scalar or [...]).

  Returns:
    [...] the first-order entropy change of each position's own step.

  Example:
    >>> import jax.numpy as jnp, covrl
    >>> z = jnp.log(jnp.array([0.7, 0.2, 0.1]))  # rewarding the likely token lowers entropy
    >>> bool(covrl.score_step_entropy_change(z, z[0], slope=-1.0) < 0)
    True
  """
  terms = logits if isinstance(logits, ScoreTerms) else score_terms(logits)
  h = terms.entropy
  log_py = jnp.asarray(log_prob, h.dtype)
  py = jnp.exp(log_py)
  own = jnp.where(py > 0, py * (jnp.where(py > 0, log_py, 0.0) + h), 0.0)
  change = jnp.asarray(slope, h.dtype) * (own - terms.spread)
  return change + jnp.asarray(bonus, h.dtype) * terms.bonus_gain


@functools.lru_cache(maxsize=32)
def _gauss_legendre_01(num_points: int) -> tuple[np.ndarray, np.ndarray]:
  nodes, weights = np.polynomial.legendre.leggauss(num_points)
  return 0.5 * (nodes + 1.0), 0.5 * weights


def entropy_change_integral(
    logits: jax.Array, logit_update: jax.Array, *, num_points: int = 16
) -> jax.Array:
  """Entropy change as -int_0^1 Cov_{pi_t}(log pi_t, dz) dt, by Gauss-Legendre quadrature.

  The integrand is the derivative of t -> H(softmax(z + t dz)), so this equals the exact change
  up to quadrature error, which falls geometrically with `num_points` (the integrand is
  analytic in t).

  Args:
    logits: [..., V].
    logit_update: [..., V].
    num_points: quadrature nodes (static), >= 1.
  """
  if not isinstance(num_points, int) or num_points < 1:
    raise ValueError(f"num_points must be a positive int, got {num_points!r}.")
  logits = check_logits(logits)
  dz = check_logit_update(logits, logit_update)
  nodes, weights = _gauss_legendre_01(num_points)

  values = jax.vmap(lambda t: _first_order(logits + t * dz, dz))(jnp.asarray(nodes, logits.dtype))
  return jnp.tensordot(jnp.asarray(weights, logits.dtype), values, axes=1)

"""Math on logits: entropy, its gradient, and how a logit update changes it.

Everything here acts on the last axis of `logits`, the vocabulary; leading axes are batch axes.
The policy is pi = softmax(z). Entries of z equal to -inf are allowed (a masked vocabulary): they
get probability 0 and contribute 0 to every value and every gradient. Inputs in bfloat16 or
float16 are computed in float32; float64 stays float64.

The identities implemented (THEORY.md T1; proofs/T1_entropy_covariance.md):

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

import jax
import jax.numpy as jnp
import numpy as np

from covrl import _checks


def _log_policy(logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Returns (log pi, pi, support) with support = pi > 0 in the sense of finite log pi."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  support = logp > -jnp.inf
  # The double `where`: masked entries must not reach the multiplication with -inf even in the
  # backward pass, where 0 * inf would turn into a NaN gradient.
  safe_logp = jnp.where(support, logp, 0.0)
  p = jnp.where(support, jnp.exp(safe_logp), 0.0)
  return safe_logp, p, support


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
  return (jnp.where(support, -p * (logp + h[..., None]), 0.0) * g[..., None],)


entropy_reverse_only.defvjp(_entropy_reverse_fwd, _entropy_reverse_bwd)


def check_logits(logits) -> jax.Array:
  """Check logits (float dtype, a vocabulary axis, no NaN / +inf / all -inf rows when concrete)
  and return them upcast to at least float32."""
  logits = _checks.check_float_array("logits", logits)
  if logits.ndim < 1 or logits.shape[-1] < 1:
    raise ValueError(f"logits must have a vocabulary axis of size >= 1, got shape {logits.shape}.")
  if _checks.is_concrete(logits):
    values = np.asarray(logits, dtype=np.float64)
    if np.isnan(values).any() or np.isposinf(values).any():
      raise ValueError("logits contain NaN or +inf; only -inf (a masked vocabulary entry) is "
                       "allowed.")
    if values.size and np.all(np.isneginf(values), axis=-1).any():
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


def _first_order(logits: jax.Array, dz: jax.Array) -> jax.Array:
  logp, _, _ = _log_policy(logits)
  return -_covariance(logits, logp, dz)


def entropy_change(logits: jax.Array, logit_update: jax.Array) -> jax.Array:
  """Exact change H(softmax(z + dz)) - H(softmax(z)).

  Computed as a difference of entropies, so in float32 it loses relative accuracy when dz is
  small; use float64 to study the small-step limit.
  """
  logits = check_logits(logits)
  dz = jnp.asarray(logit_update, logits.dtype)
  return _entropy(logits + dz) - _entropy(logits)


def entropy_change_first_order(logits: jax.Array, logit_update: jax.Array) -> jax.Array:
  """First-order entropy change -Cov_pi(log pi, dz) (Cui et al. 2025, Lemma 1)."""
  return _first_order(check_logits(logits), logit_update)


def entropy_change_second_order(logits: jax.Array, logit_update: jax.Array) -> jax.Array:
  """Second-order entropy change.

  -Cov_pi(log pi, dz) - 1/2 [Var_pi(dz) + Cov_pi(log pi, (dz - E_pi dz)^2)]; the residual is
  O(|dz|^3). Derived in proofs/T1_entropy_covariance.md.
  """
  logits = check_logits(logits)
  dz = jnp.broadcast_to(jnp.asarray(logit_update, logits.dtype), logits.shape)
  logp, p, support = _log_policy(logits)
  centred = jnp.where(support, dz, 0.0) - _expect(p, dz, support)[..., None]
  first = -_covariance(logits, logp, dz)
  var = _expect(p, centred**2, support)
  skew = _covariance(logits, logp, centred**2)
  return first - 0.5 * (var + skew)


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
  dz = jnp.broadcast_to(jnp.asarray(logit_update, logits.dtype), logits.shape)
  nodes, weights = _gauss_legendre_01(num_points)

  values = jax.vmap(lambda t: _first_order(logits + t * dz, dz))(jnp.asarray(nodes, logits.dtype))
  return jnp.tensordot(jnp.asarray(weights, logits.dtype), values, axes=1)

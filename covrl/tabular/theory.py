"""Closed forms of THEORY.md T2 for bandits: fixed points, biases, bounds, rates.

Everything here is math on arrays (rewards on the last axis, leading axes are batch axes); it
imports only covrl's core, so the dynamics in `covrl.tabular` may use it. Values follow the dtype
given (at least float32); pass float64 under `jax.enable_x64(True)` where a check needs it::

  pi_alpha = softmax(r / alpha)                          the bonus's fixed point      (T2.1)
  bias(alpha) = r* - pi_alpha . r
     0 < bias <= min(alpha log K, sum_{a != a*} Delta_a exp(-Delta_a / alpha))         (T2.3)
  J_alpha(pi_alpha) - J_alpha(pi) = alpha KL(pi || pi_alpha)                          (T2.4)
  regularised NPG:  z_t = (1 - eta alpha)^t z_0 + (1 - (1 - eta alpha)^t) r / alpha    (T2.5)
  GRPO with a bonus: pi = softmax(w(pi) / alpha), w_a(pi) = E[A_1 | a_1 = a]           (T2.7)

References:
  J. Mei et al., On the Global Convergence Rates of Softmax Policy Gradient Methods, ICML 2020.
  S. Cen et al., Fast Global Convergence of Natural Policy Gradient Methods with Entropy
  Regularization, Operations Research 2022, arXiv:2007.06558.
  Shao et al., DeepSeekMath (GRPO), arXiv:2402.03300 (2024).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.special import gammaln

from covrl import _checks
from covrl.advantages import grpo_advantages
from covrl.softmax_entropy import entropy


def _rewards(r) -> jax.Array:
  r = _checks.upcast(_checks.check_float_array("r", r))
  if r.ndim < 1 or r.shape[-1] < 2:
    raise ValueError(f"rewards need K >= 2 actions on the last axis, got shape {r.shape}.")
  if _checks.is_concrete(r) and not np.all(np.isfinite(np.asarray(r))):
    raise ValueError("rewards must be finite.")
  return r


def _alpha(alpha) -> None:
  _checks.check_positive("alpha", alpha)
  a = jnp.asarray(alpha)
  if _checks.is_concrete(a) and a.ndim and not np.all(np.asarray(a) > 0):
    raise ValueError("alpha must be > 0.")


def _per_row(alpha) -> jax.Array:
  """alpha as a scalar or [...] (one per leading index), shaped to broadcast over actions."""
  a = jnp.asarray(alpha)
  return a[..., None] if a.ndim else a


def soft_optimal_policy(r: jax.Array, alpha: float | jax.Array) -> jax.Array:
  """The stationary point of the entropy-regularised bandit objective, softmax(r / alpha).

  Args:
    r: [..., K] mean rewards.
    alpha: bonus coefficient > 0, a scalar or [...] (one per leading index).

  Returns:
    [..., K] policy pi_alpha.
  """
  r = _rewards(r)
  _alpha(alpha)
  return jax.nn.softmax(r / _per_row(alpha), axis=-1)


def soft_objective(pi: jax.Array, r: jax.Array, alpha: float | jax.Array) -> jax.Array:
  """J_alpha(pi) = pi . r + alpha H(pi) (the bonus objective), over the last axis."""
  pi = jnp.asarray(pi, _rewards(r).dtype)
  h = -jnp.sum(jnp.where(pi > 0, pi * jnp.log(jnp.where(pi > 0, pi, 1.0)), 0.0), axis=-1)
  return jnp.sum(pi * r, axis=-1) + alpha * h


def kl_divergence(p: jax.Array, q: jax.Array) -> jax.Array:
  """KL(p || q) over the last axis (0 log 0 = 0)."""
  p, q = jnp.asarray(p), jnp.asarray(q)
  safe = jnp.where(p > 0, p, 1.0)
  return jnp.sum(jnp.where(p > 0, p * (jnp.log(safe) - jnp.log(q)), 0.0), axis=-1)


def optimality_gap(pi: jax.Array, r: jax.Array) -> jax.Array:
  """r* - pi . r, computed as sum_a pi_a Delta_a (no cancellation when the gap is tiny)."""
  r = _rewards(r)
  gaps = jnp.max(r, axis=-1, keepdims=True) - r
  return jnp.sum(jnp.asarray(pi, r.dtype) * gaps, axis=-1)


def entropy_bias(r: jax.Array, alpha: float | jax.Array) -> jax.Array:
  """The bonus's optimality gap at its fixed point, r* - softmax(r / alpha) . r (T2.3)."""
  return optimality_gap(soft_optimal_policy(r, alpha), r)


def bias_bounds(r: jax.Array, alpha: float | jax.Array) -> tuple[jax.Array, jax.Array]:
  """The two upper bounds of THEORY.md T2.3 on `entropy_bias`.

  (1) alpha log K: J_alpha(pi_alpha) >= J_alpha(e_{a*}) = r* gives bias <= alpha H(pi_alpha).
  (2) sum_{a != a*} Delta_a exp(-Delta_a / alpha): pi_alpha(a) <= exp(-Delta_a / alpha).

  Returns:
    (alpha log K, sum_a Delta_a exp(-Delta_a / alpha)), each of shape [...].
  """
  r = _rewards(r)
  _alpha(alpha)
  gaps = jnp.max(r, axis=-1, keepdims=True) - r
  return (alpha * math.log(r.shape[-1]) * jnp.ones(r.shape[:-1], r.dtype),
          jnp.sum(gaps * jnp.exp(-gaps / _per_row(alpha)), axis=-1))


def kl_identity(pi: jax.Array, r: jax.Array, alpha: float | jax.Array) -> tuple[jax.Array, ...]:
  """Both sides of J_alpha(pi_alpha) - J_alpha(pi) = alpha KL(pi || pi_alpha) (T2.4).

  Returns:
    (left side, right side), each [...].
  """
  r = _rewards(r)
  pi_alpha = soft_optimal_policy(r, alpha)
  left = soft_objective(pi_alpha, r, alpha) - soft_objective(pi, r, alpha)
  return left, alpha * kl_divergence(jnp.asarray(pi, r.dtype), pi_alpha)


def stationarity_residual(pi: jax.Array, r: jax.Array, alpha: float | jax.Array) -> jax.Array:
  """A_a - alpha (log pi_a + H(pi)) per action, A = r - pi . r: zero at the fixed point (T2.2)."""
  r = _rewards(r)
  pi = jnp.asarray(pi, r.dtype)
  adv = r - jnp.sum(pi * r, axis=-1, keepdims=True)
  logp = jnp.log(pi)
  return adv - _per_row(alpha) * (logp + entropy(logp)[..., None])


def pg_logit_gradient(logits: jax.Array, r: jax.Array, alpha: float | jax.Array = 0.0, *,
                      axis: int = -1) -> jax.Array:
  """Exact gradient of J_alpha = pi . r + alpha H(pi), pi = softmax(z), with respect to z (T2.1).

  pi * [q - E_pi q] with q = r - alpha log pi. Since a per-row constant in q cancels, q is taken
  as r - alpha (z - max z): one exponential per entry and two reductions (the normaliser and
  E_pi q), the fewest of any form (the exact-gradient dynamics of `covrl.tabular` and the
  tabular benchmark sweep step with it). -inf logits are actions of probability 0.

  Args:
    logits: [..., K] (or K on `axis`).
    r: rewards, broadcastable to logits.
    alpha: bonus coefficient >= 0, a scalar or one per row (the logits' shape without `axis`).
    axis: the action axis.

  Returns:
    The gradient, shaped like logits, in their dtype (at least float32).
  """
  logits = _checks.upcast(jnp.asarray(logits))
  r = jnp.asarray(r, logits.dtype)
  alpha = jnp.expand_dims(jnp.asarray(alpha, logits.dtype), axis) if jnp.ndim(alpha) else alpha
  shifted = logits - jnp.max(logits, axis=axis, keepdims=True)
  support = shifted > -jnp.inf
  e = jnp.where(support, jnp.exp(jnp.where(support, shifted, 0.0)), 0.0)
  q = jnp.where(support, r - alpha * jnp.where(support, shifted, 0.0), 0.0)
  total = jnp.sum(e, axis=axis, keepdims=True)
  expected_q = jnp.sum(e * q, axis=axis, keepdims=True) / total
  return e / total * (q - expected_q)


def mei_gap_bound(t: jax.Array | int, c: float | jax.Array) -> jax.Array:
  """Mei et al. (2020) Theorem 2: with eta = 2/5 and rewards in [0, 1], gap_t <= 5 / (c^2 t).

  c = inf_t pi_t(a*) along the run (t >= 1).
  """
  return 5.0 / (jnp.asarray(c) ** 2 * jnp.asarray(t))


def pg_asymptotic_gap_constant(num_actions: int, step_size: float) -> float:
  """lim_t t * gap_t of exact softmax PG without a bonus: (K - 1) / (K eta) (our derivation).

  In the continuous-time limit near a unique optimal arm, with p_a = pi(a) small for every
  suboptimal a: d log p_a / dt = -eta (p_a Delta_a + gap). The products p_a Delta_a equalise to a
  common u, gap = (K - 1) u and du/dt = -eta K u^2, so u ~ 1 / (eta K t) and
  t * gap -> (K - 1) / (K eta), whatever the gaps Delta_a > 0 (proofs/T2_entropy_bonus_bias.md).
  """
  if num_actions < 2:
    raise ValueError(f"needs K >= 2, got {num_actions}.")
  _checks.check_positive("step_size", step_size)
  return (num_actions - 1) / (num_actions * step_size)


def pg_entropy_local_rate(r: jax.Array, alpha: float, step_size: float) -> jax.Array:
  """Asymptotic per-step contraction of exact PG with a bonus near pi_alpha.

  The update z <- z + eta pi * (r - alpha log pi - E_pi[r - alpha log pi]) has, at pi_alpha,
  the Jacobian I - eta alpha (diag(pi) - pi pi^T) (the other terms multiply the stationarity
  residual, which is 0 there). On logits modulo shifts its spectral radius is
  max `|1 - eta alpha lambda|` over the nonzero eigenvalues lambda of diag(pi) - pi pi^T.

  Returns:
    [...] the contraction factor rho < 1 (when eta alpha lambda_max < 2). KL(pi_t || pi_alpha)
    decays like rho^(2t).
  """
  r = _rewards(r)
  pi = soft_optimal_policy(r, alpha)
  cov = jnp.vectorize(jnp.diag, signature="(k)->(k,k)")(pi) - pi[..., :, None] * pi[..., None, :]
  lam = jnp.linalg.eigvalsh(cov)[..., 1:]  # the smallest eigenvalue is the shift direction, 0
  return jnp.max(jnp.abs(1.0 - step_size * alpha * lam), axis=-1)


def npg_regularized_logits(
    init_logits: jax.Array, r: jax.Array, alpha: float, step_size: float, t: int | jax.Array
) -> jax.Array:
  """Closed form of regularised NPG, z_t = q^t z_0 + (1 - q^t) r / alpha with q = 1 - eta alpha.

  This is the iteration z <- (1 - eta alpha) z + eta r (Cen et al. 2022, in a bandit); the
  logits are defined up to a shift per state, so compare softmax(z_t) or centred logits.
  """
  r = _rewards(r)
  _alpha(alpha)
  q = (1.0 - step_size * alpha) ** jnp.asarray(t, r.dtype)
  return q * jnp.asarray(init_logits, r.dtype) + (1.0 - q) * r / alpha


@functools.lru_cache(maxsize=64)
def _compositions(num_actions: int, count: int) -> tuple[np.ndarray, np.ndarray]:
  """All count vectors n in N^K with sum n = count, and each one's actions in a sorted row."""
  if math.comb(count + num_actions - 1, num_actions - 1) > 200_000:
    raise ValueError(f"K = {num_actions}, G - 1 = {count}: too many group outcomes to enumerate.")
  rows: list[list[int]] = []

  def fill(prefix: list[int], left: int, slots: int):
    if slots == 1:
      rows.append([*prefix, left])
      return
    for k in range(left, -1, -1):
      fill([*prefix, k], left - k, slots - 1)

  fill([], count, num_actions)
  counts = np.asarray(rows, dtype=np.int64)
  actions = np.stack([np.repeat(np.arange(num_actions), n) for n in counts]) if count else \
      np.zeros((len(counts), 0), np.int64)
  return counts, actions


def grpo_expected_advantages(
    pi: jax.Array,
    r: jax.Array,
    group_size: int,
    *,
    noise: str = "deterministic",
    eps: float = 1e-6,
    normalize_std: bool = True,
) -> jax.Array:
  """w_a(pi) = E[A_1 | a_1 = a]: a sample's expected group-normalised advantage, given its action.

  A group of G actions a_1..a_G ~ pi i.i.d. gets rewards R_i and advantages
  A_i = (R_i - mean) / (std + eps) (`covrl.grpo_advantages`). The expectation over the other
  G - 1 samples (and the rewards) is exact:

  * deterministic rewards R_i = r_{a_i}: enumerate the multinomial count vectors of the other
    G - 1 actions;
  * Bernoulli rewards, R_i = 1 with probability r_{a_i}: A_1 depends only on R_1 and on the
    number k ~ Binomial(G - 1, pi . r) of successes among the others, so
    w_a = r_a m_1 + (1 - r_a) m_0 with m_x = E_k[A_1 | R_1 = x, k].

  Since the A_i of a group sum to 0, sum_a pi_a w_a(pi) = 0, and the expected logit gradient of
  the GRPO surrogate is pi_b w_b(pi) (THEORY.md T2.7).

  Args:
    pi: [K] policy (strictly positive entries, or zeros that then have weight 0).
    r: [K] mean rewards (success probabilities in [0, 1] for Bernoulli).
    group_size: G >= 2.
    noise: "deterministic" or "bernoulli".
    eps, normalize_std: as in `covrl.grpo_advantages`.

  Returns:
    [K] w(pi).
  """
  r = _rewards(r)
  _check_group(r, group_size, noise)
  pi = jnp.asarray(pi, r.dtype)
  if noise == "bernoulli":
    return _grpo_bernoulli(pi, r, group_size, eps, normalize_std)
  num_actions = r.shape[0]
  counts, others = _compositions(num_actions, group_size - 1)
  # Multinomial probabilities of the other G - 1 actions' counts, in log space.
  log_coef = gammaln(group_size * 1.0) - jnp.sum(gammaln(jnp.asarray(counts, r.dtype) + 1.0), -1)
  logp = jnp.log(jnp.where(pi > 0, pi, 1.0))
  log_terms = jnp.where(jnp.asarray(counts) > 0, jnp.asarray(counts, r.dtype) * logp, 0.0)
  zero_mass = jnp.any((jnp.asarray(counts) > 0) & (pi <= 0), axis=-1)
  prob = jnp.where(zero_mass, 0.0, jnp.exp(log_coef + jnp.sum(log_terms, axis=-1)))  # [M]
  other_rewards = r[jnp.asarray(others)]  # [M, G - 1]
  groups = jnp.concatenate(
      [jnp.broadcast_to(r[:, None, None], (num_actions, len(counts), 1)),
       jnp.broadcast_to(other_rewards[None], (num_actions, len(counts), group_size - 1))], axis=-1
  )  # [K, M, G]: the first sample takes action a
  first = grpo_advantages(groups, eps=eps, normalize_std=normalize_std)[..., 0]
  return first @ prob


def _check_group(r: jax.Array, group_size: int, noise: str) -> None:
  if r.ndim != 1:
    raise ValueError(f"r must be [K] (vmap over states), got shape {r.shape}.")
  _checks.check_int("group_size", group_size, 2)
  if noise not in ("deterministic", "bernoulli"):
    raise ValueError(f"noise must be 'deterministic' or 'bernoulli', got {noise!r}.")
  if noise == "bernoulli" and _checks.is_concrete(r) and not np.all(
      (np.asarray(r) >= 0) & (np.asarray(r) <= 1)):
    raise ValueError("Bernoulli rewards need success probabilities in [0, 1].")


def _grpo_bernoulli(pi, p, group_size, eps, normalize_std):
  others = group_size - 1
  k = np.arange(others + 1)
  # Group reward vectors [R_1 = x, 1 (k times), 0 (G - 1 - k times)] for x in {0, 1}.
  rows = np.stack([np.concatenate([[x], np.ones(j), np.zeros(others - j)])
                   for x in (0.0, 1.0) for j in k]).reshape(2, others + 1, group_size)
  first = grpo_advantages(jnp.asarray(rows, p.dtype), eps=eps, normalize_std=normalize_std)[..., 0]
  success = jnp.clip(jnp.sum(pi * p), 0.0, 1.0)
  log_binom = jnp.asarray(gammaln(others + 1.0) - gammaln(k + 1.0) - gammaln(others - k + 1.0),
                          p.dtype)
  binom = jnp.exp(log_binom + k * jnp.log(jnp.maximum(success, 1e-300))
                  + (others - k) * jnp.log(jnp.maximum(1.0 - success, 1e-300)))
  binom = jnp.where((success == 0) | (success == 1),
                    jnp.asarray(k == jnp.round(success * others), p.dtype), binom)
  m0, m1 = first @ binom
  return p * m1 + (1.0 - p) * m0


def grpo_fixed_point(
    r: jax.Array,
    alpha: float,
    group_size: int,
    *,
    noise: str = "deterministic",
    eps: float = 1e-6,
    normalize_std: bool = True,
    damping: float = 0.5,
    num_iters: int = 2000,
) -> tuple[jax.Array, jax.Array]:
  """Solve pi = softmax(w(pi) / alpha), the entropy bonus's fixed point under GRPO advantages.

  Damped iteration in logit space, z <- (1 - d) z + d w(softmax(z)) / alpha, from z = r / alpha,
  then Newton steps on F(z) = z - w(softmax(z)) / alpha (F(z + c) = F(z) + c, so its Jacobian
  is invertible and Newton is well defined modulo nothing).

  Args:
    r: [K] mean rewards.
    alpha: bonus coefficient > 0.
    group_size: G >= 2.
    noise, eps, normalize_std: as in `grpo_expected_advantages`.
    damping: d in (0, 1].
    num_iters: iterations.

  Returns:
    (pi, residual): the policy and `max_a |w_a(pi) - alpha (log pi_a + H(pi))|`.
  """
  r = _rewards(r)
  _alpha(alpha)
  if not 0 < damping <= 1:
    raise ValueError(f"damping must lie in (0, 1], got {damping!r}.")
  _check_group(r, group_size, noise)
  _checks.check_nonnegative("eps", eps)
  return _solve_grpo_fixed_point(r, jnp.asarray(alpha, r.dtype), jnp.asarray(eps, r.dtype),
                                 jnp.asarray(damping, r.dtype), group_size, noise, normalize_std,
                                 num_iters)


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7))
def _solve_grpo_fixed_point(r, alpha, eps, damping, group_size, noise, normalize_std,
                            num_iters):
  w_of = lambda z: grpo_expected_advantages(jax.nn.softmax(z), r, group_size, noise=noise,
                                            eps=eps, normalize_std=normalize_std)
  z = lax.fori_loop(0, num_iters, lambda _, z: (1 - damping) * z + damping * w_of(z) / alpha,
                    r / alpha)
  residual_fn = lambda z: z - w_of(z) / alpha

  def newton(_, z):
    step = jnp.linalg.solve(jax.jacfwd(residual_fn)(z), residual_fn(z))
    return jnp.where(jnp.all(jnp.isfinite(step)), z - step, z)

  z = lax.fori_loop(0, 20, newton, z)
  pi = jax.nn.softmax(z)
  logp = jax.nn.log_softmax(z)
  residual = jnp.max(jnp.abs(w_of(z) - alpha * (logp + entropy(z))))
  return pi, residual


def _mdp(transitions, rewards):
  p = _checks.upcast(_checks.check_float_array("transitions", transitions))
  r = _rewards(rewards)
  if p.ndim != 3 or p.shape[:2] != r.shape or p.shape[2] != p.shape[0]:
    raise ValueError(f"transitions must be [S, K, S] for rewards [S, K], got {p.shape} and "
                     f"{r.shape}.")
  return p, r.astype(p.dtype)


def soft_policy_value(logits, transitions, rewards, gamma: float, alpha: float) -> jax.Array:
  """Entropy-regularised value V^pi(s) = E[sum_t gamma^t (r_t + alpha H(pi(.|s_t))) | s_0 = s].

  Solves V = r_pi + alpha H_pi + gamma P_pi V exactly (a linear system), so it is differentiable
  in the logits: its gradient is the exact policy gradient of the regularised MDP.

  Args:
    logits: [S, K] policy logits.
    transitions: [S, K, S] P(s' | s, a).
    rewards: [S, K] mean rewards.
    gamma: discount in [0, 1).
    alpha: bonus coefficient >= 0.

  Returns:
    [S] values.
  """
  p, r = _mdp(transitions, rewards)
  pi = jax.nn.softmax(logits, axis=-1)
  r_pi = jnp.sum(pi * r, -1) + alpha * entropy(logits)
  p_pi = jnp.einsum("sa,sat->st", pi, p)
  return jnp.linalg.solve(jnp.eye(r.shape[0], dtype=p.dtype) - gamma * p_pi, r_pi)


def soft_q_values(transitions, rewards, gamma: float, alpha: float, num_iters: int = 2000):
  """Optimal soft Q-values by soft value iteration, Q = r + gamma P (alpha logsumexp(Q / alpha)).

  The soft-optimal policy softmax(Q / alpha) is the fixed point of the entropy bonus in an MDP
  (THEORY.md T2.6); value iteration contracts at rate gamma, so `num_iters` sets the accuracy
  gamma^num_iters.

  Returns:
    [S, K] soft Q-values.
  """
  p, r = _mdp(transitions, rewards)
  _alpha(alpha)

  def body(_, q):
    v = alpha * jax.nn.logsumexp(q / alpha, axis=-1)
    return r + gamma * jnp.einsum("sat,t->sa", p, v)

  return lax.fori_loop(0, num_iters, body, r)

"""Closed forms of covrl.theory against independent NumPy references and SymPy algebra."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import covrl
from covrl._compat import enable_x64
from covrl.tabular import theory


def _np_group_advantages(rewards, eps=1e-6, normalize_std=True):
  """GRPO advantages of one group, written independently (unbiased std, as torch.std)."""
  rewards = np.asarray(rewards, np.float64)
  centred = rewards - rewards.mean()
  if not normalize_std:
    return centred
  return centred / (rewards.std(ddof=1) + eps)


def _brute_force_w(pi, r, group, noise, normalize_std=True):
  """E[A_1 | a_1 = a] by summing over every tuple of the other G - 1 actions (and rewards)."""
  k = len(pi)
  w = np.zeros(k)
  for a in range(k):
    for others in itertools.product(range(k), repeat=group - 1):
      p_others = np.prod([pi[b] for b in others])
      actions = (a, *others)
      if noise == "deterministic":
        w[a] += p_others * _np_group_advantages([r[b] for b in actions], normalize_std=
                                                normalize_std)[0]
        continue
      for outcome in itertools.product((0.0, 1.0), repeat=group):
        p_r = np.prod([r[b] if x else 1 - r[b] for b, x in zip(actions, outcome)])
        w[a] += p_others * p_r * _np_group_advantages(outcome, normalize_std=normalize_std)[0]
  return w


@pytest.mark.parametrize("noise", ["deterministic", "bernoulli"])
@pytest.mark.parametrize("group", [2, 4])
def test_grpo_expected_advantages_match_brute_force(noise, group):
  rng = np.random.default_rng(group)
  pi = rng.dirichlet(np.ones(3))
  r = rng.uniform(size=3)
  with enable_x64(True):
    w = np.asarray(theory.grpo_expected_advantages(jnp.asarray(pi), jnp.asarray(r), group,
                                                   noise=noise))
  np.testing.assert_allclose(w, _brute_force_w(pi, r, group, noise), rtol=1e-9, atol=1e-12)
  assert abs(pi @ w) < 1e-12  # the advantages of a group sum to zero


def test_dr_grpo_expected_advantages_closed_form():
  pi, r, group = np.array([0.2, 0.5, 0.3]), np.array([1.0, 0.2, 0.4]), 5
  with enable_x64(True):
    w = theory.grpo_expected_advantages(jnp.asarray(pi), jnp.asarray(r), group,
                                        normalize_std=False)
  np.testing.assert_allclose(w, (group - 1) / group * (r - pi @ r), atol=1e-12)


def test_grpo_fixed_point_solves_its_equation():
  with enable_x64(True):
    r = jnp.asarray([0.9, 0.6, 0.2])
    pi, residual = theory.grpo_fixed_point(r, 1.0, 4)
    w = np.asarray(theory.grpo_expected_advantages(pi, r, 4))
  np.testing.assert_allclose(np.asarray(pi), np.exp(w) / np.exp(w).sum(), atol=1e-12)
  assert float(residual) < 1e-12


def test_bias_and_bounds_against_numpy():
  rng = np.random.default_rng(0)
  r = rng.normal(size=(10, 6))
  alpha = 10 ** rng.uniform(-2, 1, size=10)
  with enable_x64(True):
    bias = np.asarray(theory.entropy_bias(jnp.asarray(r), jnp.asarray(alpha)))
    log_bound, gap_bound = (np.asarray(x) for x in theory.bias_bounds(jnp.asarray(r),
                                                                      jnp.asarray(alpha)))
  pi = np.exp(r / alpha[:, None])
  pi /= pi.sum(-1, keepdims=True)
  np.testing.assert_allclose(bias, r.max(-1) - (pi * r).sum(-1), rtol=1e-10)
  np.testing.assert_allclose(log_bound, alpha * np.log(6))
  gaps = r.max(-1, keepdims=True) - r
  np.testing.assert_allclose(gap_bound, (gaps * np.exp(-gaps / alpha[:, None])).sum(-1))
  assert np.all(bias > 0) and np.all(bias <= np.minimum(log_bound, gap_bound))


def test_kl_identity_against_numpy():
  rng = np.random.default_rng(1)
  pi, r, alpha = rng.dirichlet(np.ones(5)), rng.normal(size=5), 0.7
  with enable_x64(True):
    left, right = theory.kl_identity(jnp.asarray(pi), jnp.asarray(r), alpha)
  q = np.exp(r / alpha) / np.exp(r / alpha).sum()
  soft = lambda p: p @ r - alpha * (p * np.log(p)).sum()
  assert float(left) == pytest.approx(soft(q) - soft(pi), rel=1e-12)
  assert float(right) == pytest.approx(alpha * (pi * np.log(pi / q)).sum(), rel=1e-12)


def test_npg_closed_form_is_the_iteration():
  rng = np.random.default_rng(2)
  z, r, alpha, eta = rng.normal(size=4), rng.normal(size=4), 0.3, 0.8
  z0 = z.copy()
  for _ in range(25):
    z = (1 - eta * alpha) * z + eta * r
  with enable_x64(True):
    closed = theory.npg_regularized_logits(jnp.asarray(z0), jnp.asarray(r), alpha, eta, 25)
  np.testing.assert_allclose(np.asarray(closed), z, rtol=1e-12)


def test_local_rate_is_the_spectral_radius_of_the_update():
  with enable_x64(True):
    r, alpha, eta = jnp.asarray([1.0, 0.4, 0.3, 0.0]), 0.5, 1.5
    z_star = r / alpha

    def update(z):  # exact PG with a bonus, as a map on logits
      logp = jax.nn.log_softmax(z)
      soft = r - alpha * logp
      return z + eta * jnp.exp(logp) * (soft - jnp.exp(logp) @ soft)

    jac = np.asarray(jax.jacfwd(update)(z_star))
    k = len(r)
    centre = np.eye(k) - np.ones((k, k)) / k  # logits modulo shifts
    eig = np.abs(np.linalg.eigvals(centre @ jac @ centre))
    rate = float(theory.pg_entropy_local_rate(r, alpha, eta))
  assert rate == pytest.approx(np.sort(eig)[-1], rel=1e-10)


def test_soft_q_values_and_policy_value_against_numpy():
  rng = np.random.default_rng(3)
  s, k, gamma, alpha = 3, 2, 0.8, 0.4
  p = rng.dirichlet(np.ones(s), size=(s, k))
  rew = rng.uniform(size=(s, k))
  q = np.zeros((s, k))
  for _ in range(500):
    v = alpha * np.log(np.exp(q / alpha).sum(-1))
    q = rew + gamma * p @ v
  z = rng.normal(size=(s, k))
  pi = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  r_pi = (pi * rew).sum(-1) - alpha * (pi * np.log(pi)).sum(-1)
  p_pi = np.einsum("sa,sat->st", pi, p)
  v_pi = np.linalg.solve(np.eye(s) - gamma * p_pi, r_pi)
  with enable_x64(True):
    np.testing.assert_allclose(theory.soft_q_values(p, rew, gamma, alpha, 500), q, rtol=1e-10)
    np.testing.assert_allclose(theory.soft_policy_value(z, p, rew, gamma, alpha), v_pi,
                               rtol=1e-10)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="alpha"):
    theory.soft_optimal_policy(jnp.ones(3), 0.0)
  with pytest.raises(ValueError, match="K >= 2"):
    theory.entropy_bias(jnp.ones(1), 1.0)
  with pytest.raises(ValueError, match="finite"):
    theory.soft_optimal_policy(jnp.asarray([1.0, jnp.nan]), 1.0)
  with pytest.raises(ValueError, match="group_size"):
    theory.grpo_expected_advantages(jnp.ones(3) / 3, jnp.ones(3), 1)
  with pytest.raises(ValueError, match="Bernoulli"):
    theory.grpo_expected_advantages(jnp.ones(2) / 2, jnp.asarray([0.5, 2.0]), 3,
                                    noise="bernoulli")
  with pytest.raises(ValueError, match="damping"):
    theory.grpo_fixed_point(jnp.ones(3), 1.0, 3, damping=0.0)


def test_sympy_stationarity_and_kl_identity():
  """T2.1 and T2.4 as algebra, for K = 3 (symbolic logits, rewards and alpha)."""
  sp = pytest.importorskip("sympy")
  z = sp.symbols("z0:3", real=True)
  r = sp.symbols("r0:3", real=True)
  alpha = sp.symbols("alpha", positive=True)
  norm = sum(sp.exp(zi) for zi in z)
  pi = [sp.exp(zi) / norm for zi in z]
  logp = [zi - sp.log(norm) for zi in z]
  objective = sum(p * ri for p, ri in zip(pi, r)) - alpha * sum(p * lp for p, lp in zip(pi, logp))
  soft = [ri - alpha * lp for ri, lp in zip(r, logp)]
  mean_soft = sum(p * s for p, s in zip(pi, soft))
  for b in range(3):  # dJ/dz_b = pi_b (soft_b - E_pi soft)
    assert sp.simplify(sp.diff(objective, z[b]) - pi[b] * (soft[b] - mean_soft)) == 0
  # KL identity at a general q = softmax(r / alpha) against a general pi.
  norm_q = sum(sp.exp(ri / alpha) for ri in r)
  logq = [ri / alpha - sp.log(norm_q) for ri in r]
  q = [sp.exp(lq) for lq in logq]
  soft_q = sum(qi * ri for qi, ri in zip(q, r)) - alpha * sum(qi * lq for qi, lq in zip(q, logq))
  kl = sum(p * (lp - lq) for p, lp, lq in zip(pi, logp, logq))
  assert sp.simplify(sp.expand_log(soft_q - objective - alpha * kl, force=True)) == 0


@pytest.mark.float64
def test_pg_logit_gradient_is_the_gradient_of_the_regularised_objective():
  rng = np.random.default_rng(11)
  z, r = rng.normal(size=(4, 6)) * 2, rng.random((4, 6))
  alpha = np.array([0.0, 0.1, 0.5, 2.0])
  want = jax.vmap(jax.grad(lambda zz, rr, a: jnp.sum(jax.nn.softmax(zz) * rr)
                           + a * covrl.entropy(zz)))(jnp.asarray(z), jnp.asarray(r),
                                                      jnp.asarray(alpha))
  np.testing.assert_allclose(theory.pg_logit_gradient(z, r, alpha), want, atol=1e-13)
  np.testing.assert_allclose(theory.pg_logit_gradient(z.T, r.T, alpha, axis=0), np.asarray(want).T,
                             atol=1e-13)
  # A -inf logit is an action of probability 0: its gradient is 0 and the rest is finite.
  z[0, 0] = -np.inf
  g = np.asarray(theory.pg_logit_gradient(z, r, 0.3))
  assert np.all(np.isfinite(g)) and np.all(g[0, 0] == 0)

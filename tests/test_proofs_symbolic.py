"""Symbolic (SymPy) checks of the pure-algebra steps in proofs/T1-T2 for small vocabularies.

Every identity is checked exactly: logits enter through q_a = exp(z_a) > 0, so a derivative in
z_b is q_b * d/dq_b, logarithms are expanded (log q_a and log sum(q) become independent atoms),
and a difference is declared zero only when the numerator of its rational normal form expands
to the zero polynomial. Nothing is evaluated in floating point except the "mutant" checks, which
evaluate a deliberately wrong variant (a flipped sign, a swapped argument) at a random rational
point and assert that it is *not* zero: they show that each exact check can fail.

The identities (proofs/ anchors):
  T1.1  dH/dz_b = -pi_b (log pi_b + H)
  T1.2  d/dt H(softmax(z + t dz)) at t = 0 equals -Cov_pi(log pi, dz)
  T1.4  d^2/dt^2 H(softmax(z + t dz)) at t = 0 equals -[Var_pi(dz) + Cov_pi(log pi, u^2)],
        u = dz - E_pi dz, i.e. the t^2 / 2 coefficient of the series is -[...] / 2
  T1.4  (remainder) the third derivative, Lemma 3 of proofs/T1
  T1.6  first-order entropy change of the bonus step dz = eta alpha grad H is eta alpha |grad H|^2
  T2.1  grad_z J_alpha = pi * [(r - alpha log pi) - E_pi(r - alpha log pi)],
        zero at softmax(r / alpha)
  T2.3  r* - pi_alpha . r = sum_a Delta_a e^{-Delta_a/alpha} / sum_b e^{-Delta_b/alpha}
  T2.4  J_alpha(pi_alpha) - J_alpha(pi) = alpha KL(pi || pi_alpha)
  T2.5  regularised NPG: F^+ grad J_alpha = g - mean(g), the step is z <- (1 - eta alpha) z + eta r
        up to a multiple of 1, and z_t = r/alpha + (1 - eta alpha)^t (z_0 - r/alpha)
  T2.7  G = 2, 3 group-normalised advantages, binary rewards: w_a = kappa (1 - p) or -kappa p
"""

import itertools
import random

import pytest
import sympy as sp

VOCABS = (2, 3)


# ----------------------------------------------------------------------------------------------
# Helpers.


def is_zero(expr) -> bool:
  """Exact zero test: expand logs, bring to one fraction, expand the numerator."""
  expr = sp.expand_log(sp.expand(expr), force=True)
  numerator, _ = sp.fraction(sp.together(expr))
  return sp.expand(sp.expand_log(numerator, force=True)) == 0


def rational_point(symbols, seed: int) -> dict:
  """A random rational value in [1/7, 3] for every symbol (positive, so logs are defined)."""
  rng = random.Random(seed)
  return {s: sp.Rational(rng.randint(1, 21), 7) for s in symbols}


def numerically_nonzero(expr, symbols, seed: int = 0) -> bool:
  value = complex(sp.N(expr.subs(rational_point(symbols, seed)), 30))
  return abs(value) > 1e-12


class Softmax:
  """pi = softmax(z) written through q_a = exp(z_a) > 0."""

  def __init__(self, vocab: int):
    self.q = sp.symbols(f"q0:{vocab}", positive=True)
    self.vocab = vocab
    total = sum(self.q)
    self.pi = [qa / total for qa in self.q]
    self.log_pi = [sp.log(qa) - sp.log(total) for qa in self.q]

  def expect(self, x):
    return sum(p * xa for p, xa in zip(self.pi, x))

  def cov(self, x, y):
    return self.expect([xa * ya for xa, ya in zip(x, y)]) - self.expect(x) * self.expect(y)

  def entropy(self):
    return -self.expect(self.log_pi)

  def dz(self, f, b: int):
    """d f / d z_b for f written in q: z_b enters only through q_b = exp(z_b)."""
    return self.q[b] * sp.diff(f, self.q[b])


def entropy_of(q):
  total = sum(q)
  return -sum(qa / total * sp.log(qa / total) for qa in q)


# ----------------------------------------------------------------------------------------------
# T1: entropy change is a covariance.


@pytest.mark.parametrize("vocab", VOCABS)
def test_entropy_gradient(vocab):
  sm = Softmax(vocab)
  h = entropy_of(sm.q)
  for b in range(vocab):
    grad = sm.dz(h, b)
    claimed = -sm.pi[b] * (sm.log_pi[b] + sm.entropy())
    assert is_zero(grad - claimed)
    # Mutant: the sign of H flipped inside the bracket must not pass.
    mutant = -sm.pi[b] * (sm.log_pi[b] - sm.entropy())
    assert numerically_nonzero(grad - mutant, sm.q, seed=b)


def _entropy_along_line(sm: Softmax):
  d = sp.symbols(f"d0:{sm.vocab}", real=True)
  t = sp.Symbol("t", real=True)
  h_t = entropy_of([qa * sp.exp(t * da) for qa, da in zip(sm.q, d)])
  return d, t, h_t


@pytest.mark.parametrize("vocab", VOCABS)
def test_first_order_term_is_minus_covariance(vocab):
  sm = Softmax(vocab)
  d, t, h_t = _entropy_along_line(sm)
  first = sp.diff(h_t, t).subs(t, 0)
  assert is_zero(first + sm.cov(sm.log_pi, d))
  assert numerically_nonzero(first - sm.cov(sm.log_pi, d), (*sm.q, *d), seed=1)


@pytest.mark.parametrize("vocab", VOCABS)
def test_second_order_term(vocab):
  sm = Softmax(vocab)
  d, t, h_t = _entropy_along_line(sm)
  second = sp.diff(h_t, t, 2).subs(t, 0)
  u_sq = [(da - sm.expect(d)) ** 2 for da in d]
  claimed = -(sm.cov(d, d) + sm.cov(sm.log_pi, u_sq))
  assert is_zero(second - claimed)
  # The series coefficient of t^2 is half the second derivative: -[Var + Cov(log pi, u^2)] / 2.
  # Mutants: a flipped sign of the Cov(log pi, u^2) term, and the term dropped altogether.
  symbols = (*sm.q, *d)
  assert numerically_nonzero(second + sm.cov(d, d) - sm.cov(sm.log_pi, u_sq), symbols, seed=2)
  assert numerically_nonzero(second + sm.cov(d, d), symbols, seed=3)


@pytest.mark.parametrize("vocab", (2,))
def test_third_derivative(vocab):
  """Lemma 3 of proofs/T1 (bounds the T1.4 remainder): the third derivative along a line.

  V = 2 only: the exact V = 3 check passes too but takes ~15 s on one core.
  """
  sm = Softmax(vocab)
  d, t, h_t = _entropy_along_line(sm)
  third = sp.diff(h_t, t, 3).subs(t, 0)
  u = [da - sm.expect(d) for da in d]
  cube = sm.expect([ua**3 for ua in u])
  claimed = (-(2 + sm.entropy()) * cube
             - sm.expect([ua**3 * lp for ua, lp in zip(u, sm.log_pi)])
             + 3 * sm.expect([ua**2 for ua in u]) * sm.expect([ua * lp for ua, lp in
                                                                zip(u, sm.log_pi)]))
  assert is_zero(third - claimed)
  assert numerically_nonzero(third - claimed - cube, (*sm.q, *d), seed=12)


@pytest.mark.parametrize("vocab", VOCABS)
def test_bonus_first_order_effect_is_squared_gradient_norm(vocab):
  sm = Softmax(vocab)
  grad_h = [-p * (lp + sm.entropy()) for p, lp in zip(sm.pi, sm.log_pi)]
  # dz = grad H (eta alpha factored out): first-order change -Cov(log pi, dz) = |grad H|^2.
  change = -sm.cov(sm.log_pi, grad_h)
  assert is_zero(change - sum(g**2 for g in grad_h))
  assert numerically_nonzero(change + sum(g**2 for g in grad_h), sm.q, seed=4)


# ----------------------------------------------------------------------------------------------
# T2: the bonus moves the stationary point.


def _rewards(vocab):
  r = sp.symbols(f"r0:{vocab}", real=True)
  alpha = sp.Symbol("alpha", positive=True)
  return r, alpha


@pytest.mark.parametrize("vocab", VOCABS)
def test_bandit_gradient_and_stationary_point(vocab):
  sm = Softmax(vocab)
  r, alpha = _rewards(vocab)
  j_alpha = sum(p * ra for p, ra in zip(sm.pi, r)) + alpha * entropy_of(sm.q)
  g = [ra - alpha * lp for ra, lp in zip(r, sm.log_pi)]
  at_softmax = {qa: sp.exp(ra / alpha) for qa, ra in zip(sm.q, r)}
  for b in range(vocab):
    grad = sm.dz(j_alpha, b)
    assert is_zero(grad - sm.pi[b] * (g[b] - sm.expect(g)))
    # At pi = softmax(r / alpha) the gradient vanishes identically in r and alpha.
    assert is_zero(grad.subs(at_softmax))
    # Mutant: softmax(2 r / alpha) is not stationary.
    wrong = grad.subs({qa: sp.exp(2 * ra / alpha) for qa, ra in zip(sm.q, r)})
    assert numerically_nonzero(wrong, (*r, alpha), seed=5 + b)


@pytest.mark.parametrize("vocab", VOCABS)
def test_bias_closed_form(vocab):
  r, alpha = _rewards(vocab)
  # Take action 0 as optimal: Delta_a = r_0 - r_a (the identity holds for any reference action).
  weights = [sp.exp(ra / alpha) for ra in r]
  pi_alpha = [w / sum(weights) for w in weights]
  gap = r[0] - sum(p * ra for p, ra in zip(pi_alpha, r))
  delta = [r[0] - ra for ra in r]
  closed = sum(d * sp.exp(-d / alpha) for d in delta) / sum(sp.exp(-d / alpha) for d in delta)
  assert is_zero(sp.powsimp(sp.expand(gap - closed), force=True))
  assert numerically_nonzero(gap - closed * sum(sp.exp(-d / alpha) for d in delta),
                             (*r, alpha), seed=7)


def _simplex_point(vocab):
  p = list(sp.symbols(f"p0:{vocab - 1}", positive=True))
  return [*p, 1 - sum(p)], p


@pytest.mark.parametrize("vocab", VOCABS)
def test_kl_identity(vocab):
  r, alpha = _rewards(vocab)
  p, free = _simplex_point(vocab)
  z = sum(sp.exp(ra / alpha) for ra in r)
  log_pi_alpha = [ra / alpha - sp.log(z) for ra in r]
  pi_alpha = [sp.exp(ra / alpha) / z for ra in r]

  def j(pi, log_pi):
    return sum(pa * (ra - alpha * la) for pa, ra, la in zip(pi, r, log_pi))

  j_star = j(pi_alpha, log_pi_alpha)
  assert is_zero(j_star - alpha * sp.log(z))  # J_alpha(pi_alpha) = alpha log Z
  log_p = [sp.log(pa) for pa in p]
  kl = sum(pa * (la - lb) for pa, la, lb in zip(p, log_p, log_pi_alpha))
  assert is_zero(j_star - j(p, log_p) - alpha * kl)
  # Mutant: the reverse divergence KL(pi_alpha || pi) does not satisfy the identity.
  reverse = sum(qa * (lb - la) for qa, la, lb in zip(pi_alpha, log_p, log_pi_alpha))
  mutant = (j_star - j(p, log_p) - alpha * reverse).subs(
      {pa: sp.Rational(1, vocab + 1 + i) for i, pa in enumerate(free)})
  assert numerically_nonzero(mutant, (*r, alpha), seed=8)


@pytest.mark.parametrize("vocab", VOCABS)
def test_regularised_npg_direction_and_step(vocab):
  sm = Softmax(vocab)
  r, alpha = _rewards(vocab)
  eta = sp.Symbol("eta", positive=True)
  z = sp.symbols(f"z0:{vocab}", real=True)
  g = [ra - alpha * lp for ra, lp in zip(r, sm.log_pi)]
  grad = [sm.pi[b] * (g[b] - sm.expect(g)) for b in range(vocab)]
  # Fisher matrix of the softmax in logits: F = diag(pi) - pi pi^T (symmetric, kernel span(1)).
  fisher = sp.Matrix(vocab, vocab, lambda a, b: sm.pi[a] * (int(a == b) - sm.pi[b]))
  w = sp.Matrix([ga - sum(g) / vocab for ga in g])
  # w solves F w = grad J_alpha and is orthogonal to the kernel span(1): w = F^+ grad J_alpha.
  for b, v in enumerate(fisher * w):
    assert is_zero(v - grad[b])
  assert is_zero(sum(w))
  # The step z + eta w differs from (1 - eta alpha) z + eta r by a multiple of 1 once
  # log pi = z - logsumexp(z): every component of the difference is the same.
  log_pi_z = [za - sp.Symbol("lse") for za in z]
  g_z = [ra - alpha * lp for ra, lp in zip(r, log_pi_z)]
  w_z = [ga - sum(g_z) / vocab for ga in g_z]
  diff = [za + eta * wa - ((1 - eta * alpha) * za + eta * ra) for za, wa, ra in zip(z, w_z, r)]
  for a in range(1, vocab):
    assert is_zero(diff[a] - diff[0])
  # Mutant: the step without the alpha z contraction is not a shift of the regularised one.
  wrong = [za + eta * (ra - sum(r) / vocab) - ((1 - eta * alpha) * za + eta * ra)
           for za, ra in zip(z, r)]
  assert numerically_nonzero(wrong[1] - wrong[0], (*z, *r, alpha, eta), seed=10)


def test_regularised_npg_closed_form():
  t = sp.Symbol("t", integer=True, nonnegative=True)
  eta, alpha = sp.symbols("eta alpha", positive=True)
  r, z0 = sp.symbols("r z0", real=True)

  def closed(k, c=1 - eta * alpha):
    return r / alpha + c**k * (z0 - r / alpha)

  assert is_zero(closed(0) - z0)
  assert is_zero(closed(t + 1) - ((1 - eta * alpha) * closed(t) + eta * r))
  wrong = closed(t + 1, c=1 + eta * alpha) - ((1 - eta * alpha) * closed(t, 1 + eta * alpha)
                                                + eta * r)
  assert numerically_nonzero(wrong.subs(t, 3), (eta, alpha, r, z0), seed=11)


@pytest.mark.parametrize("group", (2, 3))
def test_grpo_binary_rewards(group):
  """T2.7 worked examples: G = 2, 3; reward 1 for action 0, 0 for actions 1, 2; verl's eps.

  w_a = E[A_1 | a_1 = a] by exact enumeration of all 3^G groups; the claim is
  w_a = kappa_G (1 - p) for the rewarded action and -kappa_G p for the others, with
  kappa_2 = 1 / (sqrt(2) + 2 eps) and kappa_3 = 2 / (sqrt(3) + 3 eps), p = pi_0.
  """
  p0, p1 = sp.symbols("p0 p1", positive=True)
  eps = sp.Symbol("epsilon", positive=True)
  pi = [p0, p1, 1 - p0 - p1]
  reward = [1, 0, 0]

  def advantage_first(rewards):
    # (r_1 - mean) / (std + eps), std with Bessel's correction; 0 when all rewards are equal.
    mean = sp.Rational(sum(rewards), group)
    std = sp.sqrt(sum((x - mean) ** 2 for x in rewards) / (group - 1))
    return (rewards[0] - mean) / (std + eps)

  w = [0, 0, 0]
  for actions in itertools.product(range(3), repeat=group):
    prob = sp.Mul(*[pi[a] for a in actions])
    w[actions[0]] += prob * advantage_first([reward[a] for a in actions])
  w = [sp.simplify(wa / pa) for wa, pa in zip(w, pi)]
  kappa = {2: 1 / (sp.sqrt(2) + 2 * eps), 3: 2 / (sp.sqrt(3) + 3 * eps)}[group]
  assert sp.simplify(w[0] - kappa * (1 - p0)) == 0
  assert sp.simplify(w[1] + kappa * p0) == 0
  assert sp.simplify(w[2] + kappa * p0) == 0
  assert sp.simplify(sum(pa * wa for pa, wa in zip(pi, w))) == 0  # sum_a pi_a w_a = 0
  # Mutant: dropping eps (kappa = 1/sqrt(2) or 2/sqrt(3)) must not pass.
  assert sp.simplify(w[0] - kappa.subs(eps, 0) * (1 - p0)) != 0

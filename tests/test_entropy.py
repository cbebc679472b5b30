"""Math on logits (THEORY.md T1.1-T1.5) against NumPy references and float64 finite differences."""

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _numeric import central_difference
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import covrl


def np_entropy(z):
  """Independent float64 reference: H = -sum p log p with p = softmax(z), -inf entries skipped."""
  z = np.asarray(z, np.float64)
  m = np.max(z, axis=-1, keepdims=True)
  e = np.where(np.isneginf(z), 0.0, np.exp(z - m))
  p = e / e.sum(-1, keepdims=True)
  with np.errstate(divide="ignore", invalid="ignore"):
    plogp = np.where(p > 0, p * np.log(p), 0.0)
  return -plogp.sum(-1)


def np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_cov(p, x, y):
  ex, ey = (p * x).sum(-1, keepdims=True), (p * y).sum(-1, keepdims=True)
  return (p * (x - ex) * (y - ey)).sum(-1)


fd_grad = central_difference


logit_arrays = hnp.arrays(
    np.float64, st.tuples(st.integers(1, 3), st.integers(2, 9)),
    elements=st.floats(-8, 8, allow_nan=False, width=64),
)
direction_seeds = st.integers(0, 2**31 - 1)
# The slope tests compile their programs once per shape: they draw their values as widely, from
# four shapes (one row of two logits, and up to three rows of nine).
slope_arrays = st.sampled_from([(1, 2), (2, 5), (3, 9), (1, 8)]).flatmap(lambda shape: hnp.arrays(
    np.float64, shape, elements=st.floats(-8, 8, allow_nan=False, width=64)))


@pytest.mark.float64
def test_entropy_matches_numpy_reference():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(5, 7)) * 3
  np.testing.assert_allclose(covrl.entropy(jnp.asarray(z)), np_entropy(z), rtol=1e-12)


@pytest.mark.float64
def test_entropy_uniform_is_log_v_and_stable_for_huge_logits():
  np.testing.assert_allclose(covrl.entropy(jnp.zeros(6)), np.log(6), rtol=1e-12)
  z = np.array([1e4, 1e4 - 1.0, -1e4])
  np.testing.assert_allclose(covrl.entropy(jnp.asarray(z)), np_entropy(z), rtol=1e-10)
  assert np.isfinite(covrl.entropy(jnp.asarray(z, jnp.float32)))


@pytest.mark.float64
def test_minus_inf_entries_are_probability_zero_with_finite_gradient():
  z = jnp.array([1.0, -jnp.inf, 0.5, -jnp.inf])
  np.testing.assert_allclose(covrl.entropy(z), np_entropy(np.asarray(z)), rtol=1e-12)
  g = jax.grad(covrl.entropy)(z)
  assert np.all(np.isfinite(g))
  np.testing.assert_array_equal(np.asarray(g)[[1, 3]], 0.0)
  # Against the two-action problem on the support.
  np.testing.assert_allclose(np.asarray(g)[[0, 2]], jax.grad(covrl.entropy)(z[jnp.array([0, 2])]),
                             rtol=1e-12)


def test_bfloat16_input_is_computed_in_float32():
  z = jax.random.normal(jax.random.key(0), (4, 32)) * 2
  h16 = covrl.entropy(z.astype(jnp.bfloat16))
  assert h16.dtype == jnp.float32
  # Same value as the float32 entropy of the rounded logits.
  np.testing.assert_allclose(h16, covrl.entropy(z.astype(jnp.bfloat16).astype(jnp.float32)),
                             rtol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (np.array([0.0, np.nan]), "NaN"),
    (np.array([0.0, np.inf]), r"\+inf"),
    (np.array([-np.inf, -np.inf]), "entirely -inf"),
])
def test_bad_logits_raise(bad, match):
  with pytest.raises(ValueError, match=match):
    covrl.entropy(jnp.asarray(bad))


def test_integer_logits_raise():
  with pytest.raises(TypeError, match="floating"):
    covrl.entropy(jnp.arange(3))


@pytest.mark.float64
def test_entropy_grad_closed_form_matches_finite_differences():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(3, 6)) * 2
  expected = np.stack([fd_grad(np_entropy, row) for row in z])
  np.testing.assert_allclose(covrl.entropy_grad(jnp.asarray(z)), expected, atol=1e-8)
  np.testing.assert_allclose(jax.grad(lambda x: covrl.entropy(x).sum())(jnp.asarray(z)), expected,
                             atol=1e-8)


@pytest.mark.float64
def test_entropy_second_derivatives_are_consistent():
  z = jnp.asarray(np.random.default_rng(2).normal(size=(5,)))
  check_grads(covrl.entropy, (z,), order=2, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


@pytest.mark.float64
@settings(max_examples=60, deadline=None)
@given(logit_arrays)
def test_t1_1_gradient_identity(z):
  """dH/dz_b = -pi_b (log pi_b + H); sums to zero over the vocabulary."""
  p = np_softmax(z)
  expected = -p * (np.log(p) + np_entropy(z)[..., None])
  g = np.asarray(_entropy_grad(jnp.asarray(z)))
  np.testing.assert_allclose(g, expected, atol=1e-12)
  np.testing.assert_allclose(g.sum(-1), 0.0, atol=1e-12)


# Jitted once for the hypothesis tests: they draw many shapes, and eagerly every op of a call
# compiles on its own for each new shape (test_jit_equals_no_jit covers the eager path).
_entropy_grad = jax.jit(covrl.entropy_grad)
_integral = jax.jit(lambda z, d: covrl.entropy_change_integral(z, d, num_points=32))
_exact = jax.jit(covrl.entropy_change)


def _direction(seed, shape):
  return np.random.default_rng(seed).normal(size=shape)


def _taylor_coefficients(z, d, order):
  """[order + 1, ...] Taylor coefficients of t -> H(softmax(z + t d)) at t = 0 (float64).

  An independent reference: nested forward-mode derivatives of the plain formula -sum p log p
  (no covrl code), divided by k!.
  """
  return np.asarray(_taylor(jnp.asarray(z, jnp.float64), jnp.asarray(d, jnp.float64), order))


@functools.partial(jax.jit, static_argnums=2)
def _taylor(z, d, order):
  def h(t):
    logp = jax.nn.log_softmax(z + t * d)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)

  coefficients, f, factorial = [], h, 1.0
  for k in range(order + 1):
    factorial *= max(k, 1)
    coefficients.append(f(0.0) / factorial)
    f = (lambda g: lambda t: jax.jvp(g, (t,), (1.0,))[1])(f)
  return jnp.stack(coefficients)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _residuals(z, d, epss, approx):
  """([len(epss), ...] exact entropy change minus covrl's first- or second-order one at eps d,
  covrl's second-order term at d): one compiled program per shape (eagerly each op would compile
  alone, for every shape hypothesis draws)."""
  first, second = covrl.entropy_change_first_order, covrl.entropy_change_second_order
  approx_fn = {1: first, 2: second}[approx]
  res = jnp.stack([covrl.entropy_change(z, e * d) - approx_fn(z, e * d) for e in epss])
  return res, second(z, d) - first(z, d)


@pytest.mark.float64
@settings(max_examples=40, deadline=None)
@given(slope_arrays, direction_seeds)
def test_t1_2_first_order_residual_has_slope_two(z, seed):
  d = _direction(seed, z.shape)
  epss = np.array([1e-2, 5e-3, 2.5e-3, 1.25e-3])
  res, second = (np.asarray(x) for x in _residuals(z, d, tuple(epss), 1))
  # residual / eps^2 stays bounded: it converges to the second-order coefficient.
  ratio = res / epss[:, None] ** 2
  np.testing.assert_allclose(ratio[-1], second, atol=2e-2 * (1 + np.abs(d).max() ** 3))
  # The residual is s eps^2 + c eps^3 + ...: its log-log slope is 2 only where the quadratic term
  # dominates at these steps, |c| eps <= |s| / 10 (the slope is then within 0.07 of 2).
  c = _taylor_coefficients(z, d, 3)[3]
  big = (np.abs(second) > 1e-3) & (np.abs(c) * epss[0] <= 0.1 * np.abs(second))
  if big.any():
    slopes = np.diff(np.log(np.abs(res[:, big])), axis=0) / np.diff(np.log(epss))[:, None]
    np.testing.assert_allclose(slopes[-1], 2.0, atol=0.1)


@pytest.mark.float64
@settings(max_examples=40, deadline=None)
@given(slope_arrays, direction_seeds)
def test_t1_4_second_order_residual_has_slope_three(z, seed):
  d = _direction(seed, z.shape)
  epss = np.array([1e-2, 5e-3, 2.5e-3])
  res = np.asarray(_residuals(z, d, tuple(epss), 2)[0])
  # O(eps^3): residual / eps^3 is bounded and roughly constant as eps halves.
  scaled = np.abs(res) / epss[:, None] ** 3
  bound = 10 * (1 + np.abs(d).max()) ** 3
  assert np.all(scaled < bound)
  # The residual is c eps^3 + q eps^4 + ...: slope 3 where the cubic term dominates at these
  # steps (|q| eps <= |c| / 10). Where the cubic term vanishes the residual falls faster: two
  # equal logits make H(z + eps d) even in the difference of d's entries, so every odd term
  # vanishes and the slope is 4 (test below).
  c, q = _taylor_coefficients(z, d, 4)[3:]
  big = (scaled[-1] > 1e-2) & (np.abs(q) * epss[0] <= 0.1 * np.abs(c))
  if big.any():
    slopes = np.diff(np.log(np.abs(res[:, big])), axis=0) / np.diff(np.log(epss))[:, None]
    np.testing.assert_allclose(slopes[-1], 3.0, atol=0.15)


@pytest.mark.float64
def test_t1_4_residual_slope_is_four_where_the_cubic_term_vanishes():
  # V = 2, equal logits: H(z + eps d) = h(eps (d_1 - d_2)) with h(x) the entropy of
  # softmax((x, 0)), an even function of x, so the second-order residual is O(eps^4).
  z, d = np.zeros(2), np.array([0.7, -1.3])
  epss = np.array([1e-2, 5e-3, 2.5e-3])
  res = np.array([float(covrl.entropy_change(z, e * d) - covrl.entropy_change_second_order(
      z, e * d)) for e in epss])
  slopes = np.diff(np.log(np.abs(res))) / np.diff(np.log(epss))
  np.testing.assert_allclose(slopes, 4.0, atol=0.05)


@pytest.mark.float64
@settings(max_examples=40, deadline=None)
@given(logit_arrays, direction_seeds)
def test_t1_3_integral_form_matches_exact(z, seed):
  d = _direction(seed, z.shape)
  exact = np_entropy(z + d) - np_entropy(z)
  np.testing.assert_allclose(_integral(z, d), exact, atol=1e-9)
  np.testing.assert_allclose(_exact(z, d), exact, atol=1e-12)


@pytest.mark.float64
@settings(max_examples=40, deadline=None)
@given(logit_arrays, direction_seeds, st.floats(-50, 50))
def test_t1_5_shift_invariance(z, seed, c):
  d = _direction(seed, z.shape)
  for f in (covrl.entropy_change, covrl.entropy_change_first_order,
            covrl.entropy_change_second_order):
    np.testing.assert_allclose(f(z, d + c), f(z, d), atol=1e-9)
  np.testing.assert_allclose(covrl.entropy(z + c), covrl.entropy(z), atol=1e-10)


@pytest.mark.float64
def test_first_order_is_minus_covariance_against_numpy():
  rng = np.random.default_rng(3)
  z, d = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
  p = np_softmax(z)
  np.testing.assert_allclose(covrl.entropy_change_first_order(z, d), -np_cov(p, np.log(p), d),
                             atol=1e-12)
  np.testing.assert_allclose(covrl.policy_covariance(z, d, d), np_cov(p, d, d), atol=1e-12)


@pytest.mark.float64
def test_first_order_equals_directional_derivative():
  z, d = jnp.asarray(np.random.default_rng(4).normal(size=6)), jnp.asarray(
      np.random.default_rng(5).normal(size=6))
  _, jvp = jax.jvp(covrl.entropy, (z,), (d,))
  np.testing.assert_allclose(covrl.entropy_change_first_order(z, d), jvp, atol=1e-12)


@pytest.mark.float64
def test_second_order_against_independent_numpy_formula():
  rng = np.random.default_rng(6)
  z, d = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
  p = np_softmax(z)
  u = d - (p * d).sum(-1, keepdims=True)
  expected = -np_cov(p, np.log(p), d) - 0.5 * ((p * u**2).sum(-1) + np_cov(p, np.log(p), u**2))
  np.testing.assert_allclose(covrl.entropy_change_second_order(z, d), expected, atol=1e-12)


def test_jit_equals_no_jit():
  # A random update, so that the changes are of order 1 and a relative tolerance means something
  # (a constant dz changes nothing: both sides would be float32 round-off around 0).
  rng = np.random.default_rng(7)
  z, d = (jnp.asarray(rng.normal(size=(2, 5)), jnp.float32) for _ in range(2))
  for f in (covrl.entropy_change_first_order, covrl.entropy_change_second_order,
            covrl.entropy_change_integral):
    jitted, eager = jax.jit(f)(z, d), f(z, d)
    assert float(np.min(np.abs(eager))) > 1e-3
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)

"""Math on logits (THEORY.md T1.1-T1.5) against NumPy references and float64 finite differences."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


def fd_grad(f, z, h=1e-6):
  g = np.zeros_like(z)
  for i in np.ndindex(z.shape):
    e = np.zeros_like(z)
    e[i] = h
    g[i] = (f(z + e) - f(z - e)) / (2 * h)
  return g


logit_arrays = hnp.arrays(
    np.float64, st.tuples(st.integers(1, 3), st.integers(2, 9)),
    elements=st.floats(-8, 8, allow_nan=False, width=64),
)
direction_seeds = st.integers(0, 2**31 - 1)


def test_entropy_matches_numpy_reference():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(5, 7)) * 3
  np.testing.assert_allclose(covrl.entropy(jnp.asarray(z)), np_entropy(z), rtol=1e-12)


def test_entropy_uniform_is_log_v_and_stable_for_huge_logits():
  np.testing.assert_allclose(covrl.entropy(jnp.zeros(6)), np.log(6), rtol=1e-12)
  z = np.array([1e4, 1e4 - 1.0, -1e4])
  np.testing.assert_allclose(covrl.entropy(jnp.asarray(z)), np_entropy(z), rtol=1e-10)
  assert np.isfinite(covrl.entropy(jnp.asarray(z, jnp.float32)))


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


def test_entropy_grad_closed_form_matches_finite_differences():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(3, 6)) * 2
  expected = np.stack([fd_grad(np_entropy, row) for row in z])
  np.testing.assert_allclose(covrl.entropy_grad(jnp.asarray(z)), expected, atol=1e-8)
  np.testing.assert_allclose(jax.grad(lambda x: covrl.entropy(x).sum())(jnp.asarray(z)), expected,
                             atol=1e-8)


def test_entropy_second_derivatives_are_consistent():
  z = jnp.asarray(np.random.default_rng(2).normal(size=(5,)))
  check_grads(covrl.entropy, (z,), order=2, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(logit_arrays)
def test_t1_1_gradient_identity(z):
  """dH/dz_b = -pi_b (log pi_b + H); sums to zero over the vocabulary."""
  p = np_softmax(z)
  expected = -p * (np.log(p) + np_entropy(z)[..., None])
  g = np.asarray(covrl.entropy_grad(jnp.asarray(z)))
  np.testing.assert_allclose(g, expected, atol=1e-12)
  np.testing.assert_allclose(g.sum(-1), 0.0, atol=1e-12)


def _direction(seed, shape):
  return np.random.default_rng(seed).normal(size=shape)


@settings(max_examples=40, deadline=None)
@given(logit_arrays, direction_seeds)
def test_t1_2_first_order_residual_has_slope_two(z, seed):
  d = _direction(seed, z.shape)
  epss = np.array([1e-2, 5e-3, 2.5e-3, 1.25e-3])
  res = np.stack([
      np.asarray(covrl.entropy_change(z, e * d) - covrl.entropy_change_first_order(z, e * d))
      for e in epss
  ])
  # residual / eps^2 stays bounded: it converges to the second-order coefficient.
  second = np.asarray(covrl.entropy_change_second_order(z, d) - covrl.entropy_change_first_order(
      z, d))
  ratio = res / epss[:, None] ** 2
  np.testing.assert_allclose(ratio[-1], second, atol=2e-2 * (1 + np.abs(d).max() ** 3))
  big = np.abs(second) > 1e-3
  if big.any():
    slopes = np.diff(np.log(np.abs(res[:, big])), axis=0) / np.diff(np.log(epss))[:, None]
    np.testing.assert_allclose(slopes[-1], 2.0, atol=0.1)


@settings(max_examples=40, deadline=None)
@given(logit_arrays, direction_seeds)
def test_t1_4_second_order_residual_has_slope_three(z, seed):
  d = _direction(seed, z.shape)
  epss = np.array([1e-2, 5e-3, 2.5e-3])
  res = np.stack([
      np.asarray(covrl.entropy_change(z, e * d) - covrl.entropy_change_second_order(z, e * d))
      for e in epss
  ])
  # O(eps^3): residual / eps^3 is bounded and roughly constant as eps halves.
  scaled = np.abs(res) / epss[:, None] ** 3
  bound = 10 * (1 + np.abs(d).max()) ** 3
  assert np.all(scaled < bound)
  big = scaled[-1] > 1e-2
  if big.any():
    slopes = np.diff(np.log(np.abs(res[:, big])), axis=0) / np.diff(np.log(epss))[:, None]
    np.testing.assert_allclose(slopes[-1], 3.0, atol=0.15)


@settings(max_examples=40, deadline=None)
@given(logit_arrays, direction_seeds)
def test_t1_3_integral_form_matches_exact(z, seed):
  d = _direction(seed, z.shape)
  exact = np_entropy(z + d) - np_entropy(z)
  np.testing.assert_allclose(covrl.entropy_change_integral(z, d, num_points=32), exact,
                             atol=1e-9)
  np.testing.assert_allclose(covrl.entropy_change(z, d), exact, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(logit_arrays, direction_seeds, st.floats(-50, 50))
def test_t1_5_shift_invariance(z, seed, c):
  d = _direction(seed, z.shape)
  for f in (covrl.entropy_change, covrl.entropy_change_first_order,
            covrl.entropy_change_second_order):
    np.testing.assert_allclose(f(z, d + c), f(z, d), atol=1e-9)
  np.testing.assert_allclose(covrl.entropy(z + c), covrl.entropy(z), atol=1e-10)


def test_first_order_is_minus_covariance_against_numpy():
  rng = np.random.default_rng(3)
  z, d = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
  p = np_softmax(z)
  np.testing.assert_allclose(covrl.entropy_change_first_order(z, d), -np_cov(p, np.log(p), d),
                             atol=1e-12)
  np.testing.assert_allclose(covrl.policy_covariance(z, d, d), np_cov(p, d, d), atol=1e-12)


def test_first_order_equals_directional_derivative():
  z, d = jnp.asarray(np.random.default_rng(4).normal(size=6)), jnp.asarray(
      np.random.default_rng(5).normal(size=6))
  _, jvp = jax.jvp(covrl.entropy, (z,), (d,))
  np.testing.assert_allclose(covrl.entropy_change_first_order(z, d), jvp, atol=1e-12)


def test_second_order_against_independent_numpy_formula():
  rng = np.random.default_rng(6)
  z, d = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
  p = np_softmax(z)
  u = d - (p * d).sum(-1, keepdims=True)
  expected = -np_cov(p, np.log(p), d) - 0.5 * ((p * u**2).sum(-1) + np_cov(p, np.log(p), u**2))
  np.testing.assert_allclose(covrl.entropy_change_second_order(z, d), expected, atol=1e-12)


def test_jit_equals_no_jit():
  z, d = jnp.asarray(np.random.default_rng(7).normal(size=(2, 5)), jnp.float32), jnp.ones((2, 5))
  for f in (covrl.entropy_change_first_order, covrl.entropy_change_second_order,
            covrl.entropy_change_integral):
    np.testing.assert_allclose(jax.jit(f)(z, d), f(z, d), rtol=1e-6)

"""Bad input for `covrl.diagnostics` (issue 21, round three): each edge class the docstrings name.

Concrete bad values raise an error naming the argument; under jit each function returns the
result its docstring documents. Expectations come from the docstrings and from references
written here from the definitions (NumPy, float64, `math.comb`), never from the code under test.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covrl import diagnostics

# One batch shape and one set of fractions throughout: eager calls then reuse their compiled ops.
SHAPE = (4, 9)
FRACTIONS = (0.02, 0.06, 0.5, 1.0)  # of N = 36 valid tokens: n_f = 1, 2, 18, 36


def _maybe_jit(fn, jit, **kwargs):
  return jax.jit(fn, **kwargs) if jit else fn


def _np_concentration(cov, mask, fractions):
  """share_f from its definition: rank the valid finite c_i, sum the top n_f positive parts."""
  cov = np.asarray(cov, np.float64).reshape(-1)
  valid = (np.asarray(mask).reshape(-1) != 0) & np.isfinite(cov)
  idx = np.flatnonzero(valid)
  order = idx[np.argsort(-cov[idx], kind="stable")]
  positive = np.maximum(np.where(valid, cov, 0.0), 0.0)
  total = positive.sum()
  return np.asarray([positive[order[:max(int(f * idx.size), 1)]].sum() / total if total > 0
                     else 0.0 for f in fractions])


def _np_band(cov, mask, lb, ub):
  cov = np.asarray(cov, np.float64)
  with np.errstate(invalid="ignore"):
    return int(np.sum((np.asarray(mask) != 0) & np.isfinite(cov) & (cov > lb) & (cov < ub)))


def _np_alpha(g, h):
  flat = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in
                                   jax.tree.leaves(t)])
  den = flat(h) @ flat(h)
  return flat(g) @ flat(h) / den if den > 0 else 0.0


def _np_pass_at_k(correct, k):
  correct = np.asarray(correct)
  n = correct.shape[1]
  return np.asarray([1.0 - math.comb(n - c, k) / math.comb(n, k)
                     for c in np.sum(correct != 0, axis=1)])


def _concentration(cov, mask):
  return diagnostics.covariance_concentration(cov, mask, FRACTIONS)


def _band(cov, mask):
  return diagnostics.tokens_in_band(cov, mask, -1.0, 1.0)


# "an empty or all-masked batch gives 0" (both [B, T] functions' docstrings).
_BATCH_FNS = {"concentration": (_concentration, np.zeros(len(FRACTIONS))), "band": (_band, 0)}

# ------------------------------------------------------------------------- empty batches


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("shape", [(0, 6), (3, 0), (0, 0)])
@pytest.mark.parametrize("fn", sorted(_BATCH_FNS))
def test_empty_batch_is_an_all_masked_one(fn, shape, jit):
  f, want = _BATCH_FNS[fn]
  got = _maybe_jit(f, jit)(jnp.zeros(shape), jnp.zeros(shape, bool))
  np.testing.assert_array_equal(got, want)
  assert np.all(np.isfinite(got))


# ----------------------------------------------------------- all-masked / nothing usable


def _all_masked_cases():
  rng = np.random.default_rng(0)
  cov = rng.normal(size=SHAPE).astype(np.float32)
  nonfinite = np.where(rng.random(SHAPE) < 0.5, np.nan, np.inf).astype(np.float32)
  return {
      "mask_zero": (cov, np.zeros(SHAPE, bool)),
      "nan_under_zero_int_mask": (np.full(SHAPE, np.nan, np.float32), np.zeros(SHAPE, np.int32)),
      "every_valid_cov_nonfinite": (nonfinite, np.ones(SHAPE, bool)),
  }


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", sorted(_all_masked_cases()))
@pytest.mark.parametrize("fn", sorted(_BATCH_FNS))
def test_batch_without_a_usable_token_gives_zero(fn, case, jit):
  f, want = _BATCH_FNS[fn]
  cov, mask = _all_masked_cases()[case]
  got = _maybe_jit(f, jit)(jnp.asarray(cov), jnp.asarray(mask))
  np.testing.assert_array_equal(got, want)


# ------------------------------------------------- non-finite c_i at valid positions


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_cov_is_left_out_as_the_selections_leave_it(bad, jit):
  rng = np.random.default_rng(1)
  cov = rng.standard_t(2, size=SHAPE).astype(np.float32)
  mask = rng.random(SHAPE) < 0.8
  cov[0, :4], mask[0, :4] = bad, True  # valid positions
  shares = _maybe_jit(_concentration, jit)(jnp.asarray(cov), jnp.asarray(mask))
  np.testing.assert_allclose(shares, _np_concentration(cov, mask, FRACTIONS), rtol=1e-5)
  count = _maybe_jit(diagnostics.tokens_in_band, jit)(jnp.asarray(cov), jnp.asarray(mask),
                                                      -np.inf, np.inf)
  assert int(count) == _np_band(cov, mask, -np.inf, np.inf) == np.sum(mask) - 4


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_concentration_near_the_float32_limit_is_not_inf_over_inf(jit):
  # The positive parts sum past float32's range; the shares are ratios and stay defined.
  cov = np.zeros(SHAPE, np.float32)
  cov[0, :4] = [3e38, 3e38, 1.0, -2.0]
  cov[2, :4] = [2e38, 0.0, 0.0, 5.0]
  got = _maybe_jit(_concentration, jit)(jnp.asarray(cov), jnp.ones(SHAPE))
  np.testing.assert_allclose(got, _np_concentration(cov, np.ones(SHAPE), FRACTIONS), rtol=1e-6)
  assert got[-1] == pytest.approx(1.0)


# ------------------------------------------------------------------- response_mask values


@pytest.mark.parametrize("value", [2, 0.5, -1, np.nan])
@pytest.mark.parametrize("fn", sorted(_BATCH_FNS))
def test_mask_that_is_not_binary_raises_when_concrete(fn, value):
  mask = np.ones(SHAPE, np.float32)
  mask[1, 2] = value
  with pytest.raises(ValueError, match="response_mask"):
    _BATCH_FNS[fn][0](jnp.full(SHAPE, 0.5), jnp.asarray(mask))


@pytest.mark.parametrize("value", [2.0, 0.5, -1.0])
def test_mask_under_jit_counts_any_nonzero_entry_as_valid(value):
  rng = np.random.default_rng(2)
  cov = rng.normal(size=SHAPE).astype(np.float32)
  mask = (rng.random(SHAPE) < 0.7).astype(np.float32)
  mask[mask == 1] = value
  shares = jax.jit(_concentration)(jnp.asarray(cov), jnp.asarray(mask))
  np.testing.assert_allclose(shares, _np_concentration(cov, mask, FRACTIONS), rtol=1e-5)
  count = jax.jit(diagnostics.tokens_in_band)(jnp.asarray(cov), jnp.asarray(mask), -0.5, 0.5)
  assert int(count) == _np_band(cov, mask, -0.5, 0.5)


# ------------------------------------------------------------------ fractions and dtypes


@pytest.mark.parametrize("fractions, error, match", [
    ((), ValueError, "empty"),
    ((0.0,), ValueError, r"\(0, 1\]"),
    ((-0.1,), ValueError, r"\(0, 1\]"),
    ((1.5,), ValueError, r"\(0, 1\]"),
    ((float("nan"),), ValueError, r"\(0, 1\]"),
    ((float("inf"),), ValueError, r"\(0, 1\]"),
    ((True,), TypeError, "real numbers"),
    (("0.1",), TypeError, "real numbers"),
    ((0.1 + 0j,), TypeError, "real numbers"),
    (((0.1, 0.2), (0.3, 0.4)), ValueError, "flat"),
], ids=["empty", "zero", "negative", "above_one", "nan", "inf", "bool", "str", "complex",
        "nested"])
def test_bad_fractions_raise_naming_them(fractions, error, match):
  with pytest.raises(error, match=f"fractions.*{match}|{match}.*fractions"):
    diagnostics.covariance_concentration(jnp.ones((2, 3)), jnp.ones((2, 3)), fractions)


def test_traced_fractions_raise_a_type_error_naming_them():
  fn = jax.jit(diagnostics.covariance_concentration)
  with pytest.raises(TypeError, match="fractions must be static"):
    fn(jnp.ones((2, 3)), jnp.ones((2, 3)), (0.1, 0.5))


def test_a_single_fraction_is_one_share():
  cov = jnp.zeros(SHAPE).at[1, :4].set(jnp.asarray([4.0, 1.0, 1.0, 2.0]))
  got = diagnostics.covariance_concentration(cov, jnp.ones(SHAPE), 0.06)  # n = 2 of 36
  np.testing.assert_allclose(got, [6.0 / 8.0])  # the top 2 tokens hold 4 + 2 of 8


@pytest.mark.parametrize("fn", sorted(_BATCH_FNS))
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_cov_must_be_floating(fn, dtype):
  with pytest.raises(TypeError, match="cov"):
    _BATCH_FNS[fn][0](jnp.ones(SHAPE, dtype), jnp.ones(SHAPE))


# --------------------------------------------------------------------- tokens_in_band bounds


@pytest.mark.parametrize("lb, ub, error, match", [
    (float("nan"), 1.0, ValueError, "lb must not be NaN"),
    (0.0, float("nan"), ValueError, "ub must not be NaN"),
    (jnp.float32(jnp.nan), 1.0, ValueError, "lb must not be NaN"),
    (1.0, 1.0, ValueError, "lb < ub"),
    (2.0, 1.0, ValueError, "lb < ub"),
    (np.inf, np.inf, ValueError, "lb < ub"),
    (0.0, -np.inf, ValueError, "lb < ub"),
    (np.zeros(2), 1.0, ValueError, "lb must be a scalar"),
    (0.0, jnp.ones((1, 1)), ValueError, "ub must be a scalar"),
    (True, 2.0, TypeError, "lb must be a real number"),
    ("0", 2.0, TypeError, "lb must be a real number"),
    (0.0, 1j, TypeError, "ub must be a real number"),
], ids=["nan_lb", "nan_ub", "nan_array_lb", "equal", "reversed", "both_inf", "ub_minus_inf",
        "vector_lb", "matrix_ub", "bool_lb", "str_lb", "complex_ub"])
def test_bad_band_bounds_raise_naming_them(lb, ub, error, match):
  with pytest.raises(error, match=match):
    diagnostics.tokens_in_band(jnp.zeros((2, 3)), jnp.ones((2, 3)), lb, ub)


@pytest.mark.parametrize("lb, ub", [(-np.inf, 0.5), (-0.5, np.inf), (-np.inf, np.inf),
                                    (-1, 1)], ids=["open_below", "open_above", "all", "ints"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_infinite_or_integer_bounds_are_a_band(lb, ub, jit):
  rng = np.random.default_rng(3)
  cov = rng.normal(size=SHAPE).astype(np.float32)
  cov[0, 0] = np.inf  # never in the band, even (-inf, inf)
  mask = rng.random(SHAPE) < 0.8
  got = _maybe_jit(diagnostics.tokens_in_band, jit)(jnp.asarray(cov), jnp.asarray(mask), lb, ub)
  assert int(got) == _np_band(cov, mask, lb, ub)


@pytest.mark.parametrize("lb, ub", [(np.nan, 1.0), (-1.0, np.nan), (1.0, 1.0), (2.0, -2.0)],
                         ids=["nan_lb", "nan_ub", "equal", "reversed"])
def test_empty_or_undefined_band_under_jit_counts_zero(lb, ub):
  cov = jnp.linspace(-3.0, 3.0, 36).reshape(SHAPE)
  got = jax.jit(diagnostics.tokens_in_band)(cov, jnp.ones(SHAPE), jnp.float32(lb),
                                            jnp.float32(ub))
  assert got.dtype == jnp.int32 and int(got) == 0


# ------------------------------------------------------------ balance_coefficient gradients


def _grads(seed=0):
  rng = np.random.default_rng(seed)
  g = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": [rng.normal(size=5).astype(
      np.float32), np.float32(rng.normal())]}
  h = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": [rng.normal(size=5).astype(
      np.float32), np.float32(rng.normal())]}
  return g, h


def _poison(tree, value):
  tree = jax.tree.map(np.array, tree)
  tree["b"][0][2] = value
  return tree


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("which", ["pg_grad", "entropy_grad"])
def test_nonfinite_gradient_raises_naming_it_when_concrete(which, value):
  g, h = _grads()
  g, h = (_poison(g, value), h) if which == "pg_grad" else (g, _poison(h, value))
  with pytest.raises(ValueError, match=rf"{which} has 1 non-finite.*\['b'\]\[0\]"):
    diagnostics.balance_coefficient(g, h)
  g, h = jax.tree.map(jnp.asarray, g), jax.tree.map(jnp.asarray, h)
  with pytest.raises(ValueError, match=which):  # also when a jit closes over the gradients
    jax.jit(lambda: diagnostics.balance_coefficient(g, h))()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("which", ["pg_grad", "entropy_grad", "both"])
def test_nonfinite_gradient_gives_nan_under_jit(which, value):
  # alpha* is not defined there: NaN, never the 0 of a zero entropy gradient.
  g, h = _grads(1)
  if which in ("pg_grad", "both"):
    g = _poison(g, value)
  if which in ("entropy_grad", "both"):
    h = _poison(h, value)
  assert np.isnan(float(jax.jit(diagnostics.balance_coefficient)(g, h)))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", ["zeros", "empty_leaves", "pg_zero_too"])
def test_zero_entropy_gradient_gives_zero(case, jit):
  g, h = _grads(2)
  if case == "empty_leaves":
    g, h = {"w": np.ones((0, 3), np.float32)}, {"w": np.ones((0, 3), np.float32)}
  else:
    h = jax.tree.map(np.zeros_like, h)
  if case == "pg_zero_too":
    g = jax.tree.map(np.zeros_like, g)
  got = _maybe_jit(diagnostics.balance_coefficient, jit)(g, h)
  assert float(got) == 0.0 == _np_alpha(g, h)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("g_scale, h_scale", [(1.0, 1e-25), (1.0, 1e25), (1e-30, 1e-30),
                                              (1e30, 1e30), (1e35, 1.0), (1e-35, 1e-2)])
def test_gradients_far_from_one_give_alpha_star_not_zero(g_scale, h_scale, jit):
  # |grad H|^2 under- or overflows float32 here; alpha* itself stays in range.
  g, h = _grads(3)
  g = jax.tree.map(lambda x: np.float32(x * g_scale), g)
  h = jax.tree.map(lambda x: np.float32(x * h_scale), h)
  want = _np_alpha(g, h)
  assert want != 0 and np.isfinite(np.float32(want))
  got = float(_maybe_jit(diagnostics.balance_coefficient, jit)(g, h))
  assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("which", ["pg_grad", "entropy_grad"])
@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex64])
def test_gradient_leaves_must_be_floating(which, dtype):
  g, h = _grads(4)
  bad = {"a": np.ones((3, 4), dtype), "b": g["b"]}
  g, h = (bad, h) if which == "pg_grad" else (g, bad)
  with pytest.raises(TypeError, match=rf"{which} must hold floating arrays; leaf \['a'\]"):
    diagnostics.balance_coefficient(g, h)


@pytest.mark.parametrize("g, h, match", [
    ({}, {}, "no leaves"),
    ({"a": None}, {"a": None}, "no leaves"),
    ({"a": np.ones(2)}, {"b": np.ones(2)}, "same structure"),
    ({"a": np.ones(2)}, {"a": np.ones(3)}, "differ in shape"),
], ids=["empty_dict", "none_leaf", "structure", "shape"])
def test_gradient_trees_that_do_not_match_raise(g, h, match):
  with pytest.raises(ValueError, match=match):
    diagnostics.balance_coefficient(g, h)


# ---------------------------------------------------------------------------------- pass_at_k


@pytest.mark.parametrize("value", [2, 0.5, -1, np.nan])
def test_correct_that_is_not_binary_raises_when_concrete(value):
  dtype = np.float32 if isinstance(value, float) else np.int32
  correct = np.zeros((3, 4), dtype)
  correct[1, 1] = value
  correct = jnp.asarray(correct)
  with pytest.raises(ValueError, match="correct must contain only 0 and 1"):
    diagnostics.pass_at_k(correct, 2)
  with pytest.raises(ValueError, match="correct"):  # also when a jit closes over the array
    jax.jit(lambda: diagnostics.pass_at_k(correct, 2))()


@pytest.mark.parametrize("value", [2.0, 0.5, -1.0, np.nan])
def test_correct_under_jit_counts_any_nonzero_entry(value):
  correct = np.asarray([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 0, 0, 1]], np.float32)
  correct[correct == 1] = value
  for k in (1, 3):
    got = jax.jit(diagnostics.pass_at_k, static_argnums=1)(jnp.asarray(correct), k)
    np.testing.assert_allclose(got, _np_pass_at_k(correct, k), atol=1e-6)


@pytest.mark.parametrize("dtype", [np.bool_, np.uint8, np.int32, np.float16, np.float32])
def test_correct_of_any_real_dtype_holding_0_1(dtype):
  rng = np.random.default_rng(5)
  correct = (rng.random((6, 8)) < 0.3).astype(dtype)
  got = diagnostics.pass_at_k(jnp.asarray(correct), 3)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _np_pass_at_k(correct, 3), atol=1e-6)


def test_complex_correct_is_a_type_error():
  with pytest.raises(TypeError, match="correct"):
    diagnostics.pass_at_k(jnp.ones((2, 3), jnp.complex64), 1)


@pytest.mark.parametrize("k", [0, -1, 5, 2.0, np.float32(2), True, "2", None])
def test_bad_k_raises_naming_it(k):
  with pytest.raises(ValueError, match=r"k must be .*int in \[1, 4\]"):
    diagnostics.pass_at_k(jnp.ones((3, 4), bool), k)


def test_traced_k_raises_naming_it():
  with pytest.raises(ValueError, match=r"k must be .*int"):
    jax.jit(diagnostics.pass_at_k)(jnp.ones((3, 4), bool), 2)


def test_numpy_int_k_is_an_int():
  correct = np.asarray([[1, 0, 0, 0], [1, 1, 0, 0]])
  np.testing.assert_allclose(diagnostics.pass_at_k(correct, np.int64(2)),
                             _np_pass_at_k(correct, 2), atol=1e-6)


@pytest.mark.parametrize("shape, match", [((3, 0), "no samples"), ((0, 0), "no samples"),
                                          ((4,), r"\[prompts, samples\]"),
                                          ((2, 2, 2), r"\[prompts, samples\]")])
def test_correct_shapes_without_samples_raise(shape, match):
  with pytest.raises(ValueError, match=match):
    diagnostics.pass_at_k(jnp.zeros(shape, bool), 1)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_zero_prompts_give_an_empty_result(jit):
  got = _maybe_jit(diagnostics.pass_at_k, jit, static_argnums=1)(jnp.zeros((0, 4), bool), 2)
  assert got.shape == (0,) and got.dtype == jnp.float32

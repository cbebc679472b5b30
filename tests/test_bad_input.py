"""Bad input, round two (issue 14): each case gives a clear error or a documented finite result.

Empty batches, undefined policies (NaN / +inf / all -inf logits) through the entropy, unchecked
arguments, out-of-range indices in the transform, and PyTorch's derivative at the clip bounds.
Expected values are closed forms or NumPy references computed here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import covrl
from covrl import _compat
from covrl import tokens as tk

KEY = jax.random.key(0)

# Every registered method once (the loss needs logits for the bonus and the entropy readers).
CONTROLS = [
    covrl.NoControl(), covrl.NoControl(clip_ratio=None), covrl.EntropyBonus(0.1),
    covrl.ClipHigher(), covrl.ClipCov(), covrl.ClipCov(selection="local"),
    covrl.ClipCov(selection="local", micro_batch_size=2), covrl.KLCov(),
    covrl.KLCov(selection="local"), covrl.ForkingTokens(),
    covrl.ForkingTokens(selection="local"), covrl.EntropyAdvantage(), covrl.WReinforce(),
    covrl.STEER(), covrl.STEER(mapping="linear"), covrl.AdaptiveEntropyBonus(),
]


def _ids(c):
  return f"{c.name}-{getattr(c, 'selection', '')}{getattr(c, 'micro_batch_size', '') or ''}"


# ---------------------------------------------------------------------------- empty batches


@pytest.mark.float64
@pytest.mark.parametrize("shape", [(0, 4), (2, 0)])
@pytest.mark.parametrize("control", CONTROLS, ids=_ids)
def test_an_empty_batch_gives_loss_zero_and_zero_metrics(control, shape):
  # Documented: an empty batch is an all-masked one (no valid token): loss 0, zero gradient,
  # every metric 0 except the bonus coefficient, which is reported as applied.
  lp = jnp.zeros(shape)
  logits = jnp.zeros((*shape, 5))

  def f(lp):
    return covrl.policy_loss(control, lp, lp, lp, jnp.ones(shape), key=KEY, logits=logits)

  (loss, m), g = jax.value_and_grad(f, has_aux=True)(lp)
  assert float(loss) == 0.0 and g.shape == shape
  for name, value in m.items():
    expected = float(control.bonus_coefficient(0) or 0.0) if name == "entropy_coef" else 0.0
    assert float(value) == expected, name


@pytest.mark.parametrize("mode", covrl.LOSS_AGG_MODES)
@pytest.mark.parametrize("shape", [(0, 3), (2, 0)])
def test_aggregate_of_an_empty_batch_is_zero(mode, shape):
  out = covrl.aggregate(jnp.zeros(shape), jnp.ones(shape), mode)
  assert float(out.value) == 0.0 and float(out.numerator) == 0.0


# --------------------------------------------------------------- undefined policies, NaN logits


def _bad_rows():
  z = np.zeros((2, 3, 4), np.float32)
  z[0, 1, 2] = np.nan  # a NaN logit
  z[1, 0, :] = -np.inf  # no support at all
  z[1, 2, 0] = np.inf  # a +inf logit
  return jnp.asarray(z)


def test_entropy_of_an_undefined_policy_is_nan_under_jit_and_raises_eagerly():
  z = _bad_rows()
  h = np.asarray(jax.jit(covrl.entropy)(z))
  bad = np.zeros((2, 3), bool)
  bad[0, 1] = bad[1, 0] = bad[1, 2] = True
  assert np.all(np.isnan(h[bad])) and np.allclose(h[~bad], np.log(4))
  assert np.all(np.isnan(np.asarray(jax.jit(covrl.entropy_grad)(z))[bad]))
  with pytest.raises(ValueError, match="NaN or \\+inf"):
    covrl.entropy(z)
  with pytest.raises(ValueError, match="entirely -inf"):
    covrl.entropy(jnp.full((3,), -jnp.inf))


def test_entropy_bonus_leaves_undefined_tokens_out_and_counts_them():
  z, mask = _bad_rows(), jnp.ones((2, 3))
  f = jax.jit(lambda z: covrl.entropy_bonus_loss(z, mask, coef=0.1))
  (loss, m), g = jax.value_and_grad(f, has_aux=True)(z)
  # The three remaining tokens are uniform over 4 entries: H = log 4 each.
  np.testing.assert_allclose(loss, -0.1 * np.log(4), rtol=1e-6)
  assert int(m["nonfinite_tokens"]) == 3
  assert np.all(np.isfinite(np.asarray(g)))
  with pytest.raises(ValueError, match="NaN"):
    covrl.entropy_bonus_loss(z, mask, coef=0.1)


def test_policy_loss_entropy_metrics_count_undefined_logits():
  z, mask = _bad_rows(), jnp.ones((2, 3))
  lp = jnp.full((2, 3), -1.0)
  adv = jnp.ones((2, 3))
  f = jax.jit(lambda z: covrl.policy_loss(covrl.EntropyBonus(0.1), lp, lp, adv, mask, logits=z,
                                          logit_update=jnp.ones_like(z)))
  _, m = f(z)
  assert int(m["nonfinite_tokens"]) == 3
  np.testing.assert_allclose(m["entropy"], np.log(4), rtol=1e-6)
  np.testing.assert_allclose(m["predicted_entropy_change"], 0.0, atol=1e-7)  # dz = const


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("fn", [covrl.entropy_change, covrl.entropy_change_first_order,
                                covrl.entropy_change_second_order,
                                covrl.entropy_change_integral])
def test_a_nonfinite_logit_update_raises_eagerly_and_is_nan_under_jit(fn, bad):
  z = jnp.array([1.0, 0.0, -1.0])
  dz = jnp.array([0.1, bad, 0.0])
  with pytest.raises(ValueError, match="logit_update"):
    fn(z, dz)
  assert np.isnan(float(jax.jit(fn)(z, dz)))


def test_a_logit_update_at_masked_entries_may_be_anything():
  # Entries of probability 0 (logit -inf) never reach the change (documented in the module).
  z = jnp.array([1.0, 0.0, -jnp.inf])
  for fn in (covrl.entropy_change, covrl.entropy_change_first_order,
             covrl.entropy_change_second_order, covrl.entropy_change_integral):
    a = fn(z, jnp.array([0.1, 0.0, jnp.nan]))
    b = fn(z, jnp.array([0.1, 0.0, 0.0]))
    np.testing.assert_allclose(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------ unchecked arguments

LP = jnp.log(jnp.array([[0.5, 0.25, 0.5]]))
ADV = jnp.array([[1.0, -1.0, 0.5]])
MASK = jnp.ones((1, 3))


@pytest.mark.parametrize("horizon", [0, -1.0, float("nan"), float("inf")])
def test_horizon_must_be_finite_and_positive(horizon):
  with pytest.raises(ValueError, match="horizon"):
    covrl.aggregate(ADV, MASK, "seq-mean-token-sum-norm", horizon=horizon)
  with pytest.raises(ValueError, match="horizon"):
    covrl.policy_loss(covrl.NoControl(), LP - 0.1, LP, ADV, MASK,
                      loss_agg_mode="seq-mean-token-sum-norm", horizon=horizon)


@pytest.mark.parametrize("den", [-1.0, float("nan"), float("inf")])
def test_denominator_must_be_finite_and_nonnegative(den):
  with pytest.raises(ValueError, match="denominator"):
    covrl.policy_loss(covrl.NoControl(), LP - 0.1, LP, ADV, MASK, denominator=den)
  with pytest.raises(ValueError, match="denominator"):
    covrl.aggregate(ADV, MASK, denominator_override=den)


def test_min_count_is_checked_by_the_selection_functions():
  with pytest.raises(ValueError, match="min_count"):
    covrl.kl_cov_select(ADV, MASK, ratio=0.1, min_count=-1)
  with pytest.raises(ValueError, match="min_count"):
    covrl.clip_cov_select(ADV, MASK, key=KEY, ratio=0.1, lb=0.0, ub=1.0, min_count=-1)


@pytest.mark.parametrize("key,error", [
    (0, TypeError), ("key", TypeError), (1.5, TypeError),
    (jax.random.split(KEY, 2), ValueError),
    (jax.random.split(jax.random.PRNGKey(0), 2), ValueError),
    (jnp.zeros(2, jnp.int32), TypeError),
])
def test_a_key_must_be_one_prng_key(key, error):
  with pytest.raises(error, match="key"):
    covrl.clip_cov_select(ADV, MASK, key=key, ratio=0.5, lb=-9.0, ub=9.0)
  with pytest.raises(error, match="key"):
    covrl.policy_loss(covrl.ClipCov(), LP - 0.1, LP, ADV, MASK, key=key)
  with pytest.raises(error, match="key"):
    _transform(covrl.ClipCov(clip_cov_ratio=0.5, clip_cov_lb=-9.0, clip_cov_ub=9.0),
               actions=jnp.array([0, 1]), advantages=jnp.array([1.0, -1.0]), key=key)


def test_none_key_for_clip_cov_is_a_clear_error():
  with pytest.raises(TypeError, match="key"):
    covrl.clip_cov_select(ADV, MASK, key=None, ratio=0.5, lb=-9.0, ub=9.0)
  with pytest.raises(ValueError, match="PRNG key"):
    covrl.policy_loss(covrl.ClipCov(), LP - 0.1, LP, ADV, MASK)


def test_both_key_kinds_give_the_same_tokens():
  # A typed key and its raw words are the same key (jax.random.key_data).
  a = covrl.clip_cov_select(ADV, MASK, key=KEY, ratio=0.5, lb=-9.0, ub=9.0).mask
  b = covrl.clip_cov_select(ADV, MASK, key=jax.random.key_data(KEY), ratio=0.5, lb=-9.0,
                            ub=9.0).mask
  np.testing.assert_array_equal(a, b)


def test_a_negative_value_from_a_schedule_is_rejected():
  with pytest.raises(ValueError, match="entropy_coeff"):
    _transform(covrl.EntropyBonus(lambda t: -0.1 + 0.0 * t))
  with pytest.raises(ValueError, match="ppo_kl_coef"):
    covrl.policy_loss(covrl.KLCov(ppo_kl_coef=lambda t: jnp.nan + 0.0 * t), LP - 0.1, LP, ADV,
                      MASK, step=0)
  with pytest.raises(ValueError, match="clip_cov_ratio"):
    covrl.policy_loss(covrl.ClipCov(clip_cov_ratio=lambda t: -0.5 + 0.0 * t, max_ratio=0.5),
                      LP - 0.1, LP, ADV, MASK, key=KEY, step=0)


# ------------------------------------------------------------------- the transform's indices

Z = jnp.array([1.0, 0.0, -1.0])


def _transform(control, params=Z, **kw):
  opt = covrl.transform(control)
  return opt.update(jnp.zeros_like(params), opt.init(params), params, **kw)[0]


@pytest.mark.parametrize("control", [
    covrl.KLCov(kl_cov_ratio=0.5), covrl.ClipCov(clip_cov_ratio=0.5, clip_cov_lb=-9.0,
                                                 clip_cov_ub=9.0),
    covrl.ForkingTokens(top_entropy_quantile=0.5)], ids=lambda c: c.name)
@pytest.mark.parametrize("bad_action", [3, -1])  # the battery draws the other methods
def test_out_of_range_actions_raise_eagerly_and_are_left_out_under_jit(control, bad_action):
  actions, adv = jnp.array([0, bad_action, 2, 1]), jnp.array([1.0, 2.0, -1.0, 0.5])
  old = Z + jnp.array([0.3, -0.2, 0.1])
  kw = {"key": KEY, "old_logits": old}
  with pytest.raises(ValueError, match="actions must lie in \\[0, 3\\)"):
    _transform(control, actions=actions, advantages=adv, **kw)
  got = jax.jit(lambda a: _transform(control, actions=a, advantages=adv, **kw))(actions)
  # The same samples with the bad one masked out (its index replaced by a valid one).
  want = _transform(control, actions=actions.at[1].set(0), advantages=adv,
                    response_mask=jnp.array([1, 0, 1, 1]), **kw)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_out_of_range_states_and_float_actions_are_errors():
  params = jnp.zeros((2, 3))
  control = covrl.KLCov(kl_cov_ratio=0.5)
  with pytest.raises(ValueError, match="states must lie in \\[0, 2\\)"):
    _transform(control, params, actions=jnp.array([0, 1]), advantages=jnp.array([1.0, -1.0]),
               states=jnp.array([0, 2]))
  with pytest.raises(TypeError, match="actions must be integers"):
    _transform(control, actions=jnp.array([0.0, 1.0]), advantages=jnp.array([1.0, -1.0]))
  with pytest.raises(ValueError, match="old_logits"):
    _transform(control, actions=jnp.array([0, 1]), advantages=jnp.array([1.0, -1.0]),
               old_logits=jnp.zeros((1, 3)))


def test_clip_cov_transform_with_a_nan_advantage_is_finite_under_jit():
  control = covrl.ClipCov(clip_cov_ratio=0.5, clip_cov_lb=-9.0, clip_cov_ub=9.0)
  actions, old = jnp.array([0, 1, 2]), Z + jnp.array([0.3, -0.2, 0.1])
  got = jax.jit(lambda a: _transform(control, actions=actions, advantages=a, key=KEY,
                                     old_logits=old))(jnp.array([1.0, jnp.nan, 2.0]))
  want = _transform(control, actions=actions, advantages=jnp.array([1.0, 0.0, 2.0]), key=KEY,
                    old_logits=old, response_mask=jnp.array([1, 0, 1]))
  np.testing.assert_allclose(got, want, rtol=1e-6)


# ------------------------------------------------------- the derivative at the clip bounds


def test_clamp_has_torch_derivative_at_the_bounds():
  # d clamp(x, -1, 2) / dx: 1 on the closed range [-1, 2], 0 outside (torch.clamp's).
  x = jnp.array([-3.0, -1.0, 0.5, 2.0, 4.0])
  g = jax.vmap(jax.grad(lambda v: tk.clamp(v, jnp.float32(-1.0), jnp.float32(2.0))))(x)
  np.testing.assert_array_equal(g, [0.0, 1.0, 1.0, 1.0, 0.0])
  np.testing.assert_array_equal(tk.clamp(x, -1.0, 2.0), jnp.clip(x, -1.0, 2.0))


def _exact_log(target):
  """A float32 x with jnp.exp(x) == float32(target) exactly (a float32 neighbour of log)."""
  t = np.float32(target)
  x0 = np.array([np.log(np.float64(t))], np.float32)
  cands = (x0.view(np.int32) + np.array(sorted(range(-64, 65), key=abs), np.int32)).view(
      np.float32)
  ok = np.asarray(jnp.exp(cands)) == t
  assert ok.any()
  return cands[np.argmax(ok)]


@pytest.mark.parametrize("adv", [1.0, -1.0])
@pytest.mark.parametrize("bound", [0.8, 1.2])
def test_ppo_gradient_exactly_at_a_clip_bound_is_the_unclipped_one(bound, adv):
  # max(-A r, -A clip(r, 0.8, 1.2)) with r exactly on a bound: the branches tie; with the clip's
  # derivative 1 there (torch.clamp's) both branches give d/dlog_prob = -A r, however the tie
  # is split, so the gradient is -A r (jnp.clip's 1/2 would give 3/4 of it).
  lp = jnp.array([[_exact_log(bound)]], jnp.float32)
  f32 = lambda v: jnp.full((1, 1), v, jnp.float32)

  def loss(lp):
    return covrl.ppo_loss(f32(0.0), lp, f32(adv), f32(1.0))[0]

  np.testing.assert_allclose(jax.grad(loss)(lp)[0, 0], -adv * np.float32(bound), rtol=1e-6)


def test_log_ratio_clamp_gradient_is_one_exactly_at_twenty():
  # KL-Cov's loss on one token with log r = 20 exactly: -A r + beta |log r| (no clip), so
  # d/dlog_prob = -A e^20 + beta.
  old, lp = jnp.array([[-20.0]], jnp.float32), jnp.array([[0.0]], jnp.float32)

  def loss(lp):
    return covrl.kl_cov_loss(old, lp, jnp.ones((1, 1), jnp.float32), jnp.ones((1, 1), jnp.float32),
                             kl_cov_ratio=1.0, ppo_kl_coef=0.5)[0]

  np.testing.assert_allclose(jax.grad(loss)(lp)[0, 0], -np.exp(np.float32(20.0)) + 0.5,
                             rtol=1e-6)


# ------------------------------------------------------------------------------- ppo_kl


def test_ppo_kl_is_verls_per_loss():
  rng = np.random.default_rng(0)
  old = rng.normal(-1.0, 0.3, (3, 5))
  new = old + rng.normal(0.0, 0.2, (3, 5))
  new[0, 0] = old[0, 0] + 25.0  # beyond the clamp: only the vanilla metric clamps
  adv, mask = rng.normal(size=(3, 5)), (rng.random((3, 5)) < 0.8).astype(np.float64)
  mask[0, 0] = 1.0
  lr, v = new - old, mask > 0
  with _compat.enable_x64():
    args = (jnp.asarray(old), jnp.asarray(new), jnp.asarray(adv), jnp.asarray(mask))
    m_ppo = covrl.policy_loss(covrl.NoControl(), *args)[1]
    m_cc = covrl.policy_loss(covrl.ClipCov(), *args, key=KEY)[1]
    m_kc = covrl.policy_loss(covrl.KLCov(), *args)[1]
  np.testing.assert_allclose(m_ppo["ppo_kl"], -np.clip(lr, -20, 20)[v].mean(), rtol=1e-12)
  np.testing.assert_allclose(m_cc["ppo_kl"], -lr[v].mean(), rtol=1e-12)
  np.testing.assert_allclose(m_kc["ppo_kl"], np.abs(lr)[v].mean(), rtol=1e-12)
  for m in (m_ppo, m_cc, m_kc):  # approx_kl: the same clamped k1 estimate for every method
    np.testing.assert_allclose(m["approx_kl"], -np.clip(lr, -20, 20)[v].mean(), rtol=1e-12)


def test_concrete_inputs_closed_over_by_jit_are_not_read_inside_the_trace():
  # A concrete mask or logits captured by a jitted function: the value checks must not try to
  # read a traced flag (TracerBoolConversionError before); the loss is the eager one.
  mask = jnp.array([[1.0, 1.0, 0.0]])
  z = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 4)), jnp.float32)
  eager = covrl.entropy_bonus_loss(z, mask, coef=0.1)[0]
  np.testing.assert_allclose(jax.jit(lambda: covrl.entropy_bonus_loss(z, mask, coef=0.1)[0])(),
                             eager, rtol=1e-6)
  got = jax.jit(lambda lp: covrl.policy_loss(covrl.NoControl(), LP, lp, ADV, mask)[0])(LP - 0.1)
  np.testing.assert_allclose(got, covrl.policy_loss(covrl.NoControl(), LP, LP - 0.1, ADV,
                                                    mask)[0], rtol=1e-6)

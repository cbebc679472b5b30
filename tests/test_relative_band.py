"""Clip-Cov's relative band: c_i's band measured in units of its spread over the valid tokens,
so that the selection does not depend on the scale of the advantages (verl's absolute band
does; KL-Cov's top-k does not)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import covrl
from covrl.methods.covariance import covariance_spread


def _batch(seed: int, shape=(16, 24), adv_scale: float = 1.0):
  """An on-policy batch (ratio 1, so PPO clips nothing) with heavy-tailed advantages."""
  rng = np.random.default_rng(seed)
  log_prob = np.log(rng.uniform(0.05, 1.0, shape))
  adv = np.repeat(rng.standard_t(3, (shape[0], 1)), shape[1], axis=1) * adv_scale
  mask = rng.uniform(size=shape) < 0.85
  return log_prob, adv, mask


def _select(control, log_prob, adv, mask):
  tokens = covrl.policy_tokens(jnp.asarray(log_prob), jnp.asarray(log_prob), jnp.asarray(adv),
                               jnp.asarray(mask))
  cov, selection = covrl.select_tokens(control, tokens, control.surrogate(tokens),
                                       key=jax.random.key(0))
  return np.asarray(cov), np.asarray(selection.mask)


def _np_cov(log_prob, adv, mask):
  lp, a = log_prob[mask], adv[mask]
  c = np.zeros_like(log_prob)
  c[mask] = (lp - lp.mean()) * (a - a.mean())
  return c


def test_spread_is_the_std_of_c_over_valid_tokens():
  log_prob, adv, mask = _batch(0)
  c = _np_cov(log_prob, adv, mask)
  got = float(covariance_spread(jnp.asarray(c), jnp.asarray(mask)))
  assert got == pytest.approx(float(c[mask].std()), rel=1e-5)
  assert float(covariance_spread(jnp.zeros((2, 3)), jnp.zeros((2, 3), bool))) == 0.0


def test_relative_band_candidates_match_a_numpy_reference():
  log_prob, adv, mask = _batch(1)
  lb, ub = 0.5, 3.0
  # ratio 1: every candidate is selected, so the selection is the candidate set itself.
  control = covrl.ClipCov(clip_cov_ratio=1.0, clip_cov_lb=lb, clip_cov_ub=ub, band="relative",
                          min_count=0)
  _, chosen = _select(control, log_prob, adv, mask)
  c = _np_cov(log_prob, adv, mask)
  s = c[mask].std()
  expected = mask & (c > lb * s) & (c < ub * s)
  assert expected.sum() >= 5  # the case is not vacuous
  np.testing.assert_array_equal(chosen, expected)


@pytest.mark.parametrize("scale", [0.1, 3.0, 40.0])
def test_rescaled_advantages_keep_the_relative_and_top_k_selections(scale):
  log_prob, adv, mask = _batch(2)
  relative = covrl.ClipCov(clip_cov_ratio=0.05, clip_cov_lb=0.5, clip_cov_ub=4.0,
                           band="relative")
  kl = covrl.KLCov(kl_cov_ratio=0.02, ppo_kl_coef=1.0)
  for control in (relative, kl):
    _, base = _select(control, log_prob, adv, mask)
    _, scaled = _select(control, log_prob, adv * scale, mask)
    assert base.sum() >= 2
    np.testing.assert_array_equal(base, scaled)


def test_rescaled_advantages_change_the_absolute_selection():
  log_prob, adv, mask = _batch(3)
  c = _np_cov(log_prob, adv, mask)
  absolute = covrl.ClipCov(clip_cov_ratio=1.0, clip_cov_lb=1.0, clip_cov_ub=5.0, min_count=0)
  for scale in (0.1, 10.0):
    _, chosen = _select(absolute, log_prob, adv * scale, mask)
    # c_i scales with the advantages: the absolute band's candidates are those of c * scale.
    np.testing.assert_array_equal(chosen, mask & (c * scale > 1.0) & (c * scale < 5.0))
  _, small = _select(absolute, log_prob, adv * 0.1, mask)
  _, large = _select(absolute, log_prob, adv * 10.0, mask)
  assert small.sum() != large.sum()


def test_bad_band_is_rejected():
  with pytest.raises(ValueError, match="band"):
    covrl.ClipCov(band="scaled")

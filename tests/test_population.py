"""Weighted populations (`weights=`): the expected loss over a population is the loss of a batch
in which each row occurs in proportion to its weight, for every method and aggregation mode;
Clip-Cov's weighted selection is the expectation of its random draw; bad weights are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import covrl
from covrl import selection

pytestmark = pytest.mark.float64

B, T, V = 6, 4, 5
COUNTS = np.array([1, 3, 2, 5, 1, 3])  # integer weights: 15 rows, 60 tokens, 56 unmasked


def _batch(seed=0, masked=True):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, T, V)) * 2
  ids = rng.integers(0, V, (B, T))
  lp = np.take_along_axis(logits - np.log(np.exp(logits).sum(-1, keepdims=True)),
                          ids[..., None], -1)[..., 0]
  old = lp + rng.normal(size=(B, T)) * 0.3
  adv = np.repeat(rng.normal(size=(B, 1)), T, 1)
  mask = np.ones((B, T))
  if masked:
    mask[0, 2:] = mask[4, :2] = 0  # rows of weight 1: 56 valid tokens of 60 when replicated
  return tuple(jnp.asarray(x) for x in (old, lp, adv, mask, logits))


CONTROLS = {
    "none": covrl.NoControl(),
    "bonus": covrl.EntropyBonus(0.1),
    # 0.25 * 56 = 14 tokens of the replicated batch: an integer, so the batch's floor is exact.
    "kl_cov": covrl.KLCov(kl_cov_ratio=0.25, ppo_kl_coef=1.0),
    "forking": covrl.ForkingTokens(top_entropy_quantile=0.5),
    "entropy_advantage": covrl.EntropyAdvantage(),
    "w_reinforce": covrl.WReinforce(),
    "steer": covrl.STEER(),
    "clip_higher": covrl.ClipHigher(),
}


@pytest.mark.parametrize("name, mode", [(n, "token-mean") for n in sorted(CONTROLS)] + [
    ("kl_cov", m) for m in covrl.LOSS_AGG_MODES if m != "token-mean"])
def test_integer_weights_are_replicated_rows(name, mode):
  """A row of weight n is n copies of it: the loss, its gradient and the metrics (means) agree."""
  control = CONTROLS[name]
  old, lp, adv, mask, logits = _batch()
  rows = np.repeat(np.arange(B), COUNTS)
  weights = jnp.asarray(COUNTS / COUNTS.sum())

  def weighted(x):
    return covrl.policy_loss(control, old, x, adv, mask, weights=weights, logits=logits,
                             loss_agg_mode=mode)

  def copies(x):
    return covrl.policy_loss(control, old[rows], x[rows], adv[rows], mask[rows],
                             logits=logits[rows], loss_agg_mode=mode)

  (lw, mw), gw = jax.value_and_grad(weighted, has_aux=True)(lp)
  (lr, mr), gr = jax.value_and_grad(copies, has_aux=True)(lp)
  # token-sum is a sum, not a mean: the copies' sum is COUNTS.sum() times the weighted one.
  scale = COUNTS.sum() if mode == "token-sum" else 1.0
  np.testing.assert_allclose(lw * scale, lr, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(gw * scale, gr, rtol=1e-10, atol=1e-13)
  means = {k for k in mw if k not in ("loss", "loss_numerator", "loss_denominator")}
  for key in means:
    np.testing.assert_allclose(mw[key], mr[key], rtol=1e-10, atol=1e-13, err_msg=key)


def test_forking_quantile_at_a_step_of_the_distribution():
  """When the kept share rho falls exactly on a step of F, the batch's interpolated threshold lies
  strictly between two atoms, and the population keeps the upper ones only."""
  h = jnp.asarray([[0.1, 0.2], [0.3, 0.4]])
  mask = jnp.ones((2, 2))
  counts = np.array([1, 1])
  # rho = 0.5: exactly the two upper atoms (F(0.2) = 0.5).
  got = covrl.high_entropy_select(h, mask, top_entropy_quantile=0.5,
                                  weights=jnp.asarray(counts / 2.0)).mask
  batch = covrl.high_entropy_select(jnp.repeat(h, 50, axis=0), jnp.ones((100, 2)),
                                    top_entropy_quantile=0.5).mask
  np.testing.assert_array_equal(got, [[False, False], [True, True]])
  assert bool(jnp.all(batch[::50] == got))


def test_kl_cov_share_at_the_cut():
  """The top 30% of the weight by c_i: the heaviest token fully, the next in part."""
  cov = jnp.asarray([[3.0, 1.0], [2.0, -1.0]])
  w = jnp.asarray([0.2, 0.8])  # token weights 0.2, 0.2, 0.8, 0.8 (total 2.0)
  sel_ = selection.kl_cov_select(cov, jnp.ones((2, 2)), ratio=0.3, weights=w)
  # target mass 0.6: c = 3 (0.2) fully, c = 2 (0.8) for 0.4 / 0.8 = 0.5, the rest none.
  np.testing.assert_allclose(sel_.mask, [[1.0, 0.0], [0.5, 0.0]])
  np.testing.assert_allclose(sel_.count, 0.6)


def test_clip_cov_weighted_share_is_the_expected_draw():
  """Over many keys, each band candidate of the replicated batch is drawn with the frequency the
  weighted selection gives it (min(1, r N / N_band)), within 5 standard errors."""
  rng = np.random.default_rng(3)
  cov = jnp.asarray(rng.uniform(0, 6, size=(4, 8)))
  counts = np.array([2, 5, 1, 4])
  rows = np.repeat(np.arange(4), counts)
  ratio = 0.125  # 0.125 * 96 = 12 tokens of the replicated batch
  share = selection.clip_cov_select(cov, jnp.ones((4, 8)), key=None, ratio=ratio, lb=1.0, ub=5.0,
                                    weights=jnp.asarray(counts / counts.sum())).mask
  keys = jax.random.split(jax.random.key(0), 4000)
  draw = jax.vmap(lambda k: selection.clip_cov_select(
      cov[rows], jnp.ones((len(rows), 8)), key=k, ratio=ratio, lb=1.0, ub=5.0).mask)(keys)
  freq = np.asarray(draw, np.float64).mean(0)  # [rows, 8]
  expected = np.asarray(share)[rows]
  band = (np.asarray(cov) > 1) & (np.asarray(cov) < 5)
  n_band = int((band[rows]).sum())
  np.testing.assert_allclose(expected[band[rows]], min(1.0, 12 / n_band))
  se = np.sqrt(expected * (1 - expected) / len(keys)) + 1e-12
  assert np.all(np.abs(freq - expected) <= 5 * se + 1e-12)


def test_clip_cov_weighted_loss_needs_no_key_and_matches_the_expected_loss():
  old, lp, adv, mask, _ = _batch(masked=False)
  w = jnp.asarray(COUNTS / COUNTS.sum())
  control = covrl.ClipCov(clip_cov_ratio=0.05, clip_cov_lb=0.0, clip_cov_ub=10.0)
  loss, m = covrl.policy_loss(control, old, lp, adv, mask, weights=w)
  # The expected loss: each candidate's PPO loss scaled by (1 - its share).
  tokens = covrl.policy_tokens(old, lp, adv, mask, weights=w)
  surrogate = control.surrogate(tokens)
  cov = covrl.token_covariance(lp, adv, mask, weights=w)
  cand = (cov > 0) & (cov < 10) & ~surrogate.clipped
  token_w = np.asarray(w)[:, None] * np.ones((B, T))
  share = min(1.0, 0.05 * token_w.sum() / token_w[np.asarray(cand)].sum())
  expected = np.sum(token_w * np.asarray(surrogate.loss) * np.where(cand, 1 - share, 1.0)) / (
      token_w.sum())
  np.testing.assert_allclose(loss, expected, rtol=1e-12)
  np.testing.assert_allclose(m["selected_frac"], min(0.05, token_w[np.asarray(cand)].sum() / (
      token_w.sum())), rtol=1e-12)


def test_zero_weight_rows_are_outside_the_population():
  old, lp, adv, mask, logits = _batch()
  w = jnp.asarray([0.0, 0.3, 0.0, 0.4, 0.2, 0.1])
  keep = np.asarray(w) > 0
  for control in (covrl.KLCov(kl_cov_ratio=0.2, ppo_kl_coef=1.0), covrl.STEER(),
                  covrl.ForkingTokens(0.5)):
    a, ma = covrl.policy_loss(control, old, lp, adv, mask, weights=w, logits=logits)
    b, mb = covrl.policy_loss(control, old[keep], lp[keep], adv[keep], mask[keep],
                              weights=w[keep], logits=logits[keep])
    np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_allclose(ma["cov_mean"], mb["cov_mean"], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("bad, error", [
    (np.ones(B + 1), ValueError), (np.ones((B, T)), ValueError), (-np.ones(B), ValueError),
    (np.full(B, np.nan), ValueError), (np.ones(B, np.int32), TypeError)])
def test_bad_weights_are_refused(bad, error):
  old, lp, adv, mask, _ = _batch()
  with pytest.raises(error, match="weights"):
    covrl.policy_loss(covrl.NoControl(), old, lp, adv, mask, weights=jnp.asarray(bad))


def test_under_jit_a_negative_weight_leaves_its_row_out():
  old, lp, adv, mask, _ = _batch()
  w = jnp.asarray([0.2, -1.0, 0.2, 0.2, 0.2, 0.2])
  f = jax.jit(lambda w: covrl.policy_loss(covrl.NoControl(), old, lp, adv, mask, weights=w)[0])
  keep = np.arange(B) != 1
  ref = covrl.policy_loss(covrl.NoControl(), old[keep], lp[keep], adv[keep], mask[keep],
                          weights=w[keep])[0]
  np.testing.assert_allclose(f(w), ref, rtol=1e-12)


def test_weighted_selection_is_global_only():
  old, lp, adv, mask, _ = _batch()
  control = covrl.KLCov(selection="local", micro_batch_size=3)
  with pytest.raises(ValueError, match="selection='global'"):
    covrl.policy_loss(control, old, lp, adv, mask, weights=jnp.ones(B) / B)

"""Per-method metrics of the common metrics dict (tokens touched, the method's own first-order
entropy effect) against float64 references, for every registered method; and every method in
the transformer lab: one update runs, moves the parameters and reports the common metrics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import covrl
from covrl.transformer import GRPOConfig, get_trainer, init_params, lab


def controls() -> dict[str, covrl.Control]:
  """One value of every registered method (the test fails when a new one is not listed)."""
  values = {
      "none": covrl.NoControl(),
      "entropy": covrl.EntropyBonus(0.3),
      "clip_higher": covrl.ClipHigher(),
      "clip_cov": covrl.ClipCov(clip_cov_ratio=0.2, clip_cov_lb=0.0, clip_cov_ub=5.0),
      "kl_cov": covrl.KLCov(kl_cov_ratio=0.2, ppo_kl_coef=1.0),
      "forking_tokens": covrl.ForkingTokens(0.3),
      "entropy_advantage": covrl.EntropyAdvantage(alpha=0.4),
      "w_reinforce": covrl.WReinforce(0.1),
      "steer": covrl.STEER(),
      "adaptive_entropy": covrl.AdaptiveEntropyBonus(entropy_coeff=3e-3),
  }
  assert set(values) == set(covrl.METHODS), "list a value of every registered method here"
  return values


def np_policy(z):
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  logp = np.log(np.where(p > 0, p, 1.0))
  return p, logp, -(p * logp).sum(-1)


def batch(seed=0, b=4, t=6, v=5):
  rng = np.random.default_rng(seed)
  z = 1.5 * rng.normal(size=(b, t, v))
  z[1, :, -1] = -np.inf  # a masked vocabulary entry
  y = rng.integers(0, v - 1, size=(b, t))
  adv = np.repeat(rng.normal(size=(b, 1)), t, axis=1)
  mask = np.ones((b, t), bool)
  mask[0, 4:] = False
  logp = np_policy(z)[1]
  old = np.take_along_axis(logp, y[..., None], -1)[..., 0] + 0.2 * rng.normal(size=(b, t))
  return z, y, old, adv, mask


@pytest.mark.float64
def test_score_step_entropy_change_is_minus_cov_of_the_full_step():
  """NumPy: dz = -g (e_y - pi) + beta grad H, change -Cov_pi(log pi, dz), -inf entries too."""
  z, y, _, _, _ = batch(1)
  rng = np.random.default_rng(2)
  g, beta = rng.normal(size=y.shape), 0.7
  p, logp, h = np_policy(z)
  onehot = np.eye(z.shape[-1])[y]
  grad_h = np.where(p > 0, -p * (logp + h[..., None]), 0.0)
  dz = -g[..., None] * (onehot - p) + beta * grad_h
  cov = lambda a, b: (p * (a - (p * a).sum(-1, keepdims=True)) * b).sum(-1)
  want = -cov(np.where(p > 0, logp, 0.0), dz)
  log_py = np.take_along_axis(logp, y[..., None], -1)[..., 0]
  got = covrl.score_step_entropy_change(jnp.asarray(z), log_py, g, beta)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
  assert np.all(np.isfinite(got))


@pytest.mark.float64
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_loss_entropy_change_is_the_entropy_derivative_along_each_method_step(mode):
  """For every method: the metric equals (1/N) sum_t grad H_t . (-d L_sum / dz_t), L_sum the
  token-sum loss (bonus included) differentiated end to end, in any aggregation mode, and a
  float64 central difference of the mean entropy along that step agrees."""
  z, y, old, adv, mask = batch()
  key = jax.random.key(3)

  def gathered(zz):
    return jnp.take_along_axis(jax.nn.log_softmax(zz), jnp.asarray(y)[..., None], -1)[..., 0]

  def loss(zz, control, agg):
    return covrl.policy_loss(control, old, gathered(zz), adv, mask, key=key, logits=zz,
                             loss_agg_mode=agg)

  zz = jnp.asarray(z)
  p, logp, h = np_policy(z)
  grad_h = np.where(p > 0, -p * (logp + h[..., None]), 0.0)
  for name, control in controls().items():
    _, metrics = loss(zz, control, mode)
    step = -np.asarray(jax.grad(lambda x, c=control: loss(x, c, "token-sum")[0])(zz))
    step = np.where(np.isfinite(z), step, 0.0)
    want = (grad_h * step).sum(-1)[mask].mean()
    np.testing.assert_allclose(metrics["loss_entropy_change"], want, rtol=1e-9, atol=1e-14,
                               err_msg=name)
    eps = 1e-5
    mean_h = lambda s, step=step: np_policy(z + s * step)[2][mask].mean()
    fd = (mean_h(eps) - mean_h(-eps)) / (2 * eps)
    np.testing.assert_allclose(metrics["loss_entropy_change"], fd, rtol=1e-5, atol=1e-10,
                               err_msg=name)


def test_touched_fraction_of_every_method_is_its_own_rule():
  """touched_frac counts the tokens whose loss the method changes, by each method's rule."""
  z, y, old, adv, mask = batch(4)
  logp = np.take_along_axis(np_policy(z)[1], y[..., None], -1)[..., 0]
  r = np.exp(old * 0 + logp - old)
  got = {name: float(covrl.policy_loss(c, old, logp, adv, mask, key=jax.random.key(0),
                                       logits=z)[1]["touched_frac"])
         for name, c in controls().items()}
  n = mask.sum()
  assert got["none"] == 0.0
  assert got["entropy"] == got["adaptive_entropy"] == 1.0  # the bonus: every valid token
  let_through = mask & (adv > 0) & (r > 1.2) & (r <= 1.28)
  np.testing.assert_allclose(got["clip_higher"], let_through.sum() / n)
  np.testing.assert_allclose(got["w_reinforce"], (mask & (adv > 0)).sum() / n)
  # Forking tokens removes the gradient of the tokens below the entropy quantile.
  h = np_policy(z)[2]
  kept = mask & (h >= np.quantile(h[mask], 0.7, method="linear"))
  np.testing.assert_allclose(got["forking_tokens"], (mask & ~kept).sum() / n)
  for name in ("clip_cov", "kl_cov", "steer", "entropy_advantage"):
    assert 0.0 < got[name] <= 1.0, name


# ---------------------------------------------------------------- the transformer lab
@pytest.mark.slow  # one compiled update per method (~25 s of CPU)
def test_every_method_runs_one_update_in_the_transformer_lab():
  """GRPOConfig.control = each method's value: one PPO update (1 epoch, 1 mini-batch) runs,
  changes the parameters, and reports the same common metrics, finite."""
  base = dataclasses.replace(lab.lab_config("test"), sft=None, ppo_epochs=1, num_minibatches=1,
                             prompts_per_step=4, token_ratio_bound=0.25)
  trainer = get_trainer(base)
  params = init_params(base.model, jax.random.key(0))
  _, _, data, _ = trainer.batch(params, jax.random.key(1))
  # A random start solves no prompt (all advantages 0): give the rows GRPO-like advantages.
  rows = jnp.sign(jax.random.normal(jax.random.key(4), (data.advantages.shape[0], 1)))
  data = data._replace(advantages=jnp.where(data.response_mask, rows, 0.0))
  keys = set()
  for name, control in controls().items():
    config = dataclasses.replace(base, control=control)
    assert isinstance(config, GRPOConfig)
    tr = get_trainer(config)
    state = tr.init(jax.random.key(2), params, control=control)
    new, _, metrics, _ = tr.update(state, data, jax.random.key(3))
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree.leaves(new), jax.tree.leaves(state.params)))
    assert moved > 0, name
    metrics = {k: np.asarray(v) for k, v in metrics.items()}
    for k in ("touched_frac", "loss_entropy_change", "entropy", "selected_frac", "loss"):
      assert np.all(np.isfinite(metrics[k])), (name, k)
    keys.add(frozenset(metrics))
    if name not in ("none", "clip_higher"):  # clip-higher acts off-policy only (ratio > 1.2)
      assert float(metrics["touched_frac"].max()) > 0, name
  assert len(keys) == 1

"""covrl.transform and schedules: against the losses, closed forms and optax itself."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import covrl
from covrl import schedules


def samples(seed, n=64, k=5):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=k)
  actions = rng.integers(0, k, size=n)
  adv = rng.normal(size=n)
  return jnp.asarray(logits), jnp.asarray(actions), jnp.asarray(adv)


def pg_grad(logits, actions, adv, old_logits=None):
  """Gradient of covrl's token-mean policy-gradient surrogate over the samples."""
  old = logits if old_logits is None else old_logits

  def loss(z):
    lp = jax.nn.log_softmax(z)[actions][None]
    olp = jax.lax.stop_gradient(jax.nn.log_softmax(old)[actions][None])
    return covrl.policy_gradient_loss(olp, lp, adv[None], jnp.ones_like(lp))[0]

  return jax.grad(loss)(logits)


def test_entropy_bonus_adds_minus_coef_times_entropy_gradient():
  z = jnp.array([1.0, 0.2, -0.5, 2.0])
  g = jnp.array([0.1, -0.2, 0.05, 0.05])
  tx = covrl.transform(covrl.EntropyBonus(0.3), temperature=0.5)
  updates, state = tx.update(g, tx.init(z), z)
  expected = g - 0.3 * jax.grad(lambda x: covrl.entropy(x / 0.5))(z)
  np.testing.assert_allclose(updates, expected, rtol=1e-12)
  assert int(state.count) == 1


@pytest.mark.float64
def test_entropy_bonus_in_chain_with_sgd_converges_to_softmax_r_over_alpha():
  """T2.1 in three lines: exact PG plus the bonus transform reaches softmax(r / alpha)."""
  r, alpha = jnp.array([1.0, 0.9, 0.1]), 0.2
  opt = optax.chain(covrl.transform(covrl.EntropyBonus(alpha)), optax.sgd(2.0))  # eta <= 1 / alpha
  z = jnp.zeros(3)
  state = opt.init(z)

  def step(carry, _):
    z, state = carry
    pi = jax.nn.softmax(z)
    grad = -pi * (r - pi @ r)  # gradient of -pi.r with respect to the logits
    updates, state = opt.update(grad, state, z)
    return (optax.apply_updates(z, updates), state), None

  (z, _), _ = jax.lax.scan(step, (z, state), None, length=20000)
  np.testing.assert_allclose(jax.nn.softmax(z), jax.nn.softmax(r / alpha), atol=1e-8)


def test_schedules_and_inject_hyperparams():
  z = jnp.array([1.0, -1.0, 0.5])
  g = jnp.zeros(3)
  sched = schedules.inverse_time(0.2, offset=4.0)
  tx = covrl.transform(covrl.EntropyBonus(sched))
  state = tx.init(z)
  for t in range(3):
    updates, state = jax.jit(tx.update)(g, state, z)
    np.testing.assert_allclose(updates, -sched(t) * covrl.entropy_grad(z), rtol=1e-6)
  injected = optax.inject_hyperparams(
      lambda entropy_coeff: covrl.transform(covrl.EntropyBonus(entropy_coeff)))(entropy_coeff=0.2)
  state = injected.init(z)
  updates, state = jax.jit(injected.update)(g, state, z)
  np.testing.assert_allclose(updates, -0.2 * covrl.entropy_grad(z), rtol=1e-6)
  state.hyperparams["entropy_coeff"] = jnp.asarray(0.05)
  updates, _ = jax.jit(injected.update)(g, state, z)
  np.testing.assert_allclose(updates, -0.05 * covrl.entropy_grad(z), rtol=1e-6)


@pytest.mark.float64
def test_kl_cov_transform_equals_kl_cov_loss_gradient():
  z, actions, adv = samples(0)
  old = z + 0.3 * jnp.asarray(np.random.default_rng(1).normal(size=z.shape))
  tx = covrl.transform(covrl.KLCov(kl_cov_ratio=0.1, ppo_kl_coef=0.7))
  base = pg_grad(z, actions, adv, old)
  updates, _ = tx.update(base, tx.init(z), z, actions=actions, advantages=adv, old_logits=old)

  def loss(x):
    lp = jax.nn.log_softmax(x)[actions][None]
    olp = jax.nn.log_softmax(old)[actions][None]
    return covrl.kl_cov_loss(olp, lp, adv[None], jnp.ones_like(lp), kl_cov_ratio=0.1,
                             ppo_kl_coef=0.7)[0]

  np.testing.assert_allclose(updates, jax.grad(loss)(z), atol=1e-12)
  assert np.abs(np.asarray(updates - base)).max() > 1e-4  # it did act


def test_kl_cov_transform_is_inert_on_policy():
  z, actions, adv = samples(2)
  tx = covrl.transform(covrl.KLCov(kl_cov_ratio=0.5, ppo_kl_coef=1.0))
  base = pg_grad(z, actions, adv)
  updates, _ = tx.update(base, tx.init(z), z, actions=actions, advantages=adv, old_logits=z)
  np.testing.assert_array_equal(updates, base)


@pytest.mark.float64
def test_clip_cov_transform_equals_clip_cov_loss_gradient():
  z, actions, adv = samples(3, n=128)
  key = jax.random.key(4)
  tx = covrl.transform(covrl.ClipCov(clip_cov_ratio=0.05, clip_cov_lb=0.01, clip_cov_ub=5.0))
  base = pg_grad(z, actions, adv)
  updates, _ = tx.update(base, tx.init(z), z, key=key, actions=actions, advantages=adv)

  def loss(x):
    lp = jax.nn.log_softmax(x)[actions][None]
    return covrl.clip_cov_loss(jax.lax.stop_gradient(lp), lp, adv[None], jnp.ones_like(lp),
                               key=key, clip_cov_ratio=0.05, clip_cov_lb=0.01,
                               clip_cov_ub=5.0)[0]

  np.testing.assert_allclose(updates, jax.grad(loss)(z), atol=1e-12)
  assert np.abs(np.asarray(updates - base)).max() > 1e-5


def test_contextual_params_need_states():
  z = jnp.zeros((3, 4))
  actions, adv = jnp.array([0, 1, 2]), jnp.array([1.0, -1.0, 0.5])
  tx = covrl.transform(covrl.KLCov(kl_cov_ratio=0.5, ppo_kl_coef=1.0))
  with pytest.raises(ValueError, match="states"):
    tx.update(z, tx.init(z), z, actions=actions, advantages=adv, old_logits=z)
  updates, _ = tx.update(z, tx.init(z), z, actions=actions, advantages=adv, old_logits=z,
                         states=jnp.array([0, 1, 2]))
  assert updates.shape == (3, 4)


def test_annealed_ratio_uses_static_bound_from_schedule():
  z, actions, adv = samples(5, n=100)
  old = z + 0.5
  ratio = schedules.inverse_time(0.2, offset=1.0)
  tx = covrl.transform(covrl.KLCov(kl_cov_ratio=ratio, ppo_kl_coef=1.0))
  state = tx.init(z)
  up0, state = jax.jit(tx.update)(jnp.zeros(5), state, z, actions=actions, advantages=adv,
                                  old_logits=z - 0.3)
  assert np.all(np.isfinite(np.asarray(up0)))
  with pytest.raises(ValueError, match="max_ratio"):
    covrl.KLCov(kl_cov_ratio=lambda t: 0.1)
  del old


@pytest.mark.parametrize("factory", [
    lambda: covrl.EntropyBonus(-0.1),
    lambda: covrl.transform(covrl.EntropyBonus(0.1), temperature=0.0),
    lambda: covrl.KLCov(ppo_kl_coef=-1.0),
    lambda: covrl.KLCov(kl_cov_ratio=1.5),
    lambda: covrl.ClipCov(clip_cov_lb=2.0, clip_cov_ub=1.0),
    lambda: covrl.ClipCov(clip_cov_ratio=-0.1),
])
def test_bad_hyperparameters_raise_when_built(factory):
  with pytest.raises(ValueError):
    factory()


def test_power_decay_values_and_conditions():
  s = schedules.power_decay(2.0, 0.75, offset=10.0)
  np.testing.assert_allclose(s(30), 2.0 * 4.0 ** -0.75, rtol=1e-6)
  assert s.vanishes and s.sum_diverges and s.square_summable
  c = schedules.constant(0.1)
  assert not c.vanishes and c.sum_diverges and not c.square_summable
  assert not schedules.power_decay(1.0, 2.0).sum_diverges
  assert not schedules.power_decay(1.0, 0.4).square_summable


def test_check_annealing():
  eta = schedules.robbins_monro(0.5, power=0.75)
  report = schedules.check_annealing(eta, schedules.inverse_time(1.0))
  assert report.ok and report.bias_summable  # 0.75 + 1 > 1
  assert not schedules.annealing_report(eta, schedules.power_decay(1.0, 0.2)).bias_summable
  with pytest.raises(ValueError, match="anneal fast enough"):
    schedules.check_annealing(eta, 0.1)
  # beta_t -> 0 is not enough (the counterexample of T3.4): 0.75 + 0.2 < 1.
  with pytest.raises(ValueError, match="alone is not enough"):
    schedules.check_annealing(eta, schedules.power_decay(1.0, 0.2))
  # Exact gradients with a constant step: beta_t must then be summable itself.
  assert schedules.check_annealing(0.3, schedules.power_decay(1.0, 1.5),
                                   exact_gradients=True).ok
  with pytest.raises(ValueError, match="anneal fast enough"):
    schedules.check_annealing(0.3, schedules.inverse_time(1.0), exact_gradients=True)
  with pytest.raises(ValueError, match="not be summable"):
    schedules.check_annealing(schedules.power_decay(1.0, 1.5), schedules.inverse_time(1.0))
  with pytest.raises(ValueError, match="square-summable"):
    schedules.check_annealing(0.1, schedules.inverse_time(1.0))
  with pytest.raises(TypeError, match="PowerDecay"):
    schedules.check_annealing(optax.constant_schedule(0.1), 0.0)
  with pytest.raises(ValueError, match=r"\(1/2, 1\]"):
    schedules.robbins_monro(1.0, power=0.3)
  with pytest.raises(ValueError, match="power"):
    schedules.PowerDecay(1.0, -1.0)


def test_covariance_transforms_under_inject_hyperparams():
  """Shape-determining arguments stay static; the coefficient is injected and can change."""
  z, actions, adv = samples(6)
  old = z - 0.4
  tx = optax.inject_hyperparams(
      lambda ppo_kl_coef, kl_cov_ratio: covrl.transform(
          covrl.KLCov(kl_cov_ratio=kl_cov_ratio, ppo_kl_coef=ppo_kl_coef)),
      static_args=("kl_cov_ratio",))(ppo_kl_coef=1.0, kl_cov_ratio=0.1)
  plain = covrl.transform(covrl.KLCov(kl_cov_ratio=0.1, ppo_kl_coef=0.25))
  state = tx.init(z)
  state.hyperparams["ppo_kl_coef"] = jnp.asarray(0.25)
  kw = dict(actions=actions, advantages=adv, old_logits=old)
  got, _ = jax.jit(lambda s: tx.update(jnp.zeros(5), s, z, **kw))(state)
  want, _ = plain.update(jnp.zeros(5), plain.init(z), z, **kw)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  clip = optax.inject_hyperparams(
      lambda clip_cov_ratio: covrl.transform(covrl.ClipCov(clip_cov_ratio=clip_cov_ratio)),
      static_args=("clip_cov_ratio",))(clip_cov_ratio=0.05)
  up, _ = jax.jit(lambda s: clip.update(jnp.zeros(5), s, z, key=jax.random.key(0),
                                        actions=actions, advantages=adv))(clip.init(z))
  assert np.all(np.isfinite(np.asarray(up)))

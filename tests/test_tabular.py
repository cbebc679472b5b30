"""covrl.tabular: loops against independent references, determinism, sharding, bad configs."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import covrl
from covrl import schedules, tabular
from covrl._compat import enable_x64
from covrl.tabular import bandits


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _final(config, key=0):
  return np.asarray(jax.jit(tabular.make_train(config))(jax.random.key(key)).logits)


@pytest.mark.float64
def test_regularised_npg_is_the_closed_form_iteration():
  bandit = bandits.random_bandit(0, 5)
  z0 = np.random.default_rng(1).normal(size=(1, 5))
  alpha, eta, steps = 0.3, 0.7, 40
  config = tabular.TabularConfig(bandit, dynamics="npg", control=covrl.EntropyBonus(alpha),
                                 step_size=eta, num_steps=steps, init_logits=z0,
                                 dtype="float64")
  z = z0.copy()
  for _ in range(steps):
    z = (1 - eta * alpha) * z + eta * bandit.r
  # Logits are defined up to a shift: compare the policies.
  np.testing.assert_allclose(_softmax(_final(config)), _softmax(z), rtol=1e-12, atol=1e-15)


@pytest.mark.float64
@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_exact_pg_matches_a_numpy_loop(alpha):
  bandit = bandits.Bandit([[0.1, 0.9, 0.5], [0.7, 0.2, 0.4]], state_probs=(0.3, 0.7))
  z0 = np.random.default_rng(2).normal(size=(2, 3))
  eta, steps = 0.5, 60
  control = covrl.EntropyBonus(alpha) if alpha else covrl.NoControl()
  config = tabular.TabularConfig(bandit, dynamics="pg", control=control, step_size=eta,
                                 num_steps=steps, init_logits=z0, dtype="float64")
  z = z0.copy()
  for _ in range(steps):
    pi = _softmax(z)
    adv = bandit.r - (pi * bandit.r).sum(-1, keepdims=True)
    h = -(pi * np.log(pi)).sum(-1, keepdims=True)
    grad_h = -pi * (np.log(pi) + h)
    z = z + eta * bandit.rho[:, None] * (pi * adv + alpha * grad_h)
  np.testing.assert_allclose(_final(config), z, rtol=1e-12)


@pytest.mark.float64
def test_annealed_step_size_schedule():
  bandit = bandits.Bandit((1.0, 0.0))
  eta = schedules.power_decay(1.0, 0.7, 10.0)
  config = tabular.TabularConfig(bandit, dynamics="npg", step_size=eta, num_steps=20,
                                 dtype="float64")
  z = np.zeros((1, 2))
  for t in range(20):
    pi = _softmax(z)
    z = z + eta.init_value * (1 + t / 10.0) ** -0.7 * (bandit.r - (pi * bandit.r).sum())
  np.testing.assert_allclose(_final(config), z, rtol=1e-12)


def test_records_and_shapes():
  bandit = bandits.random_bandit(3, 4, 2)
  config = tabular.TabularConfig(bandit, num_steps=30, record_every=10)
  result = tabular.make_train(config)(jax.random.key(0))
  assert result.steps.tolist() == [0, 10, 20, 30]
  assert result.policy.shape == (4, 2, 4) and result.logits.shape == (2, 4)
  pi = np.asarray(result.policy)
  gap = bandit.optimal_value - (bandit.rho[None] * (pi * bandit.r).sum(-1)).sum(-1)
  np.testing.assert_allclose(result.gap, gap, rtol=1e-5, atol=1e-6)


def _sampled(**kw):
  base = dict(dynamics="sampled", num_steps=20, record_every=5, num_samples=32, group_size=4,
              advantage="grpo", step_size=0.5, ppo_epochs=2, num_minibatches=2)
  return tabular.TabularConfig(bandits.random_bandit(0, 4, 3, noise="bernoulli"),
                               **{**base, **kw})


@pytest.mark.parametrize("control", [
    covrl.NoControl(), covrl.EntropyBonus(0.1),
    covrl.ClipCov(clip_cov_ratio=0.1, clip_cov_lb=0.1, clip_cov_ub=5.0),
    covrl.KLCov(kl_cov_ratio=0.1, ppo_kl_coef=1.0), covrl.ClipHigher(0.2, 0.28)],
    ids=lambda c: c.name)
def test_same_key_same_result(control):
  config = _sampled(control=control)
  train = jax.jit(tabular.make_train(config))
  a, b = train(jax.random.key(7)), train(jax.random.key(7))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  c = train(jax.random.key(8))
  assert not np.array_equal(a.logits, c.logits)


def _same_to_two_ulps(a, b):
  """Integers (counts, selections) exactly, floats to two ulps: XLA may vectorise a float32
  reduction differently for a different number of rows, so programs over other batch shapes may
  round differently."""
  a, b = np.asarray(a), np.asarray(b)
  if np.issubdtype(a.dtype, np.floating):
    np.testing.assert_allclose(a, b, rtol=2 * np.finfo(a.dtype).eps, atol=0)
  else:
    np.testing.assert_array_equal(a, b)


def test_run_on_one_and_eight_devices_agree():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (simulated) devices")
  config = _sampled(control=covrl.KLCov(kl_cov_ratio=0.1, ppo_kl_coef=1.0))
  keys = jax.random.split(jax.random.key(0), 8)
  hyper = tabular.hyperparams(config, step_size=np.linspace(0.1, 0.8, 8))
  one = tabular.run(config, keys, hyper, mesh=tabular.data_mesh(1))
  eight = tabular.run(config, keys, hyper, mesh=tabular.data_mesh(8))
  assert len(eight.logits.sharding.device_set) == 8
  # Each device runs its seeds' programs on its own rows (measured: 4 of 40 final logits one float32
  # ulp apart, since the clamp's custom JVP and the defined-rows test changed the program).
  jax.tree.map(_same_to_two_ulps, one, eight)


def test_run_equals_vmapped_train_and_single_runs():
  config = _sampled(ppo_epochs=1, num_minibatches=1)
  keys = jax.random.split(jax.random.key(1), 4)
  hyper = tabular.hyperparams(config, step_size=[0.1, 0.2, 0.3, 0.4])
  chunked = tabular.run(config, keys, hyper, num_chunks=4)
  vmapped = jax.jit(jax.vmap(tabular.make_train(config)))(keys, hyper)
  # A chunk of one row is a different program from a batch of four (measured with jax 0.12: 5 of
  # 20 final logits one float32 ulp apart; bit-equal with jax 0.10).
  jax.tree.map(_same_to_two_ulps, chunked, vmapped)
  single = jax.jit(tabular.make_train(config))(keys[2], jax.tree.map(lambda x: x[2], hyper))
  np.testing.assert_allclose(single.logits, chunked.logits[2], rtol=1e-5, atol=1e-5)


def test_sampled_pg_is_unbiased_for_the_exact_gradient():
  """E[one sampled step] = one exact PG step (baseline advantages, no clipping, one update)."""
  bandit = bandits.Bandit((0.9, 0.5, 0.1, 0.3), noise="bernoulli")
  z0 = np.array([[0.5, -0.3, 0.2, 0.0]])
  eta, n = 0.1, 64
  config = tabular.TabularConfig(bandit, dynamics="sampled", advantage="baseline", step_size=eta,
                                 control=covrl.NoControl(clip_ratio=None), num_samples=n,
                                 group_size=1, num_steps=1, init_logits=z0, dtype="float64")
  runs = 4000
  with enable_x64(True):
    result = tabular.run(config, jax.random.split(jax.random.key(3), runs))
  dz = np.asarray(result.logits)[:, 0] - z0[0]
  pi = _softmax(z0[0])
  expected = eta * pi * (bandit.r[0] - pi @ bandit.r[0])
  se = dz.std(0, ddof=1) / np.sqrt(runs)
  assert np.all(np.abs(dz.mean(0) - expected) < 5 * se + 1e-12), (dz.mean(0), expected, se)


def test_inverse_cdf_sampler_frequencies():
  probs = jnp.asarray([0.1, 0.0, 0.6, 0.3])
  u = jax.random.uniform(jax.random.key(0), (200_000,))
  counts = np.bincount(np.asarray(tabular.dynamics.inverse_cdf(u, probs)), minlength=4) / 200_000
  np.testing.assert_allclose(counts, probs, atol=0.005)
  assert counts[1] == 0


def _stable_argsort_reference(bits: np.ndarray, float64: bool) -> np.ndarray:
  """NumPy's stable argsort of the uniforms the sampled step draws (its own formula)."""
  if float64:
    u = bits.astype(np.float64) * 2.0**-32 + 2.0**-33
  else:
    u = (bits >> 8).astype(np.float32) * np.float32(2.0**-24) + np.float32(2.0**-25)
  return np.argsort(u, axis=-1, kind="stable")


@pytest.mark.parametrize("n", [1, 2, 3, 64, 128, 129])
def test_shuffle_order_is_the_stable_argsort_of_the_uniforms(n):
  rng = np.random.default_rng(n)
  bits = rng.integers(0, 2**32, size=(6, n), dtype=np.uint32)
  # Rows of ties: float32 keeps 24 bits, and above 1/2 rounds an odd value up to the next even
  # one, so these rows hold many equal uniforms (ordered by index) and some near-equal ones.
  top = np.uint32(2**31)
  bits[3] = top + (np.arange(n, dtype=np.uint32) % 3) * np.uint32(256)
  bits[4] = (np.arange(n, dtype=np.uint32) % 2) * np.uint32(256)
  bits[5] = top + (np.arange(n, dtype=np.uint32)[::-1] % 4) * np.uint32(256) + np.uint32(7)
  order = tabular.dynamics.shuffle_order(jnp.asarray(bits), jnp.float32)
  np.testing.assert_array_equal(order, _stable_argsort_reference(bits, False))
  with enable_x64(True):
    order = tabular.dynamics.shuffle_order(jnp.asarray(bits), jnp.float64)
  np.testing.assert_array_equal(order, _stable_argsort_reference(bits, True))


@pytest.mark.float64
def test_grpo_exact_step_is_pi_times_w():
  bandit = bandits.Bandit((0.9, 0.6, 0.2))
  z0 = np.array([[0.1, 0.4, -0.2]])
  config = tabular.TabularConfig(bandit, dynamics="grpo_exact", advantage="grpo", step_size=1.0,
                                 group_size=3, num_steps=1, init_logits=z0, dtype="float64")
  pi = _softmax(z0[0])
  w = np.zeros(3)
  for actions in itertools.product(range(3), repeat=3):
    rew = bandit.r[0][list(actions)]
    adv = (rew - rew.mean()) / (rew.std(ddof=1) + 1e-6)
    w[actions[0]] += np.prod(pi[list(actions[1:])]) * adv[0]
  np.testing.assert_allclose(_final(config)[0] - z0[0], pi * w, atol=1e-12)


def test_hyperparams_sweep_validates_and_broadcasts():
  config = tabular.TabularConfig(bandits.random_bandit(0, 3), control=covrl.EntropyBonus(0.5))
  hyper = tabular.hyperparams(config, coef=[0.1, 0.2, 0.3])
  assert hyper.coef.shape == (3,) and hyper.step_size.shape == (3,)
  assert hyper.init_logits.shape == (3, 1, 3)
  with pytest.raises(ValueError, match="coef"):
    tabular.hyperparams(config, coef=[0.1, -1.0])
  with pytest.raises(ValueError, match="step_size"):
    tabular.hyperparams(config, step_size=[0.0])
  with pytest.raises(ValueError, match="init_logits"):
    tabular.hyperparams(config, init_logits=[np.full((1, 3), np.nan)])
  with pytest.raises(ValueError, match="unknown"):
    tabular.hyperparams(config, temperature=[1.0])
  with pytest.raises(ValueError, match="same number"):
    tabular.hyperparams(config, coef=[0.1], step_size=[0.1, 0.2])


BANDIT = bandits.Bandit((1.0, 0.5))


# Each case builds its keywords lazily: a bad control value raises when it is built.
@pytest.mark.parametrize("kwargs, error, match", [
    (lambda: dict(step_size=0.0), ValueError, "step_size"),
    (lambda: dict(step_size=-1.0), ValueError, "step_size"),
    (lambda: dict(step_size=float("nan")), ValueError, "step_size"),
    (lambda: dict(step_size="0.1"), TypeError, "step_size"),
    (lambda: dict(control=covrl.EntropyBonus(0.0)), ValueError, "coef"),
    (lambda: dict(control=covrl.EntropyBonus(-0.5)), ValueError, "coef"),
    (lambda: dict(dynamics="sampled", control=covrl.KLCov(ppo_kl_coef=0.0)), ValueError, "coef"),
    (lambda: dict(control=covrl.KLCov(ppo_kl_coef=1.0)), ValueError, "sampled"),
    (lambda: dict(dynamics="sampled", control=covrl.ClipCov(clip_cov_ratio=1.5)), ValueError,
     "fraction"),
    (lambda: dict(dynamics="sampled", num_samples=30, group_size=8), ValueError, "group_size"),
    (lambda: dict(dynamics="sampled", num_samples=32, group_size=8, num_minibatches=3),
     ValueError, "num_minibatches"),
    (lambda: dict(num_steps=10, record_every=3), ValueError, "record_every"),
    (lambda: dict(num_steps=0), ValueError, "num_steps"),
    (lambda: dict(dynamics="adam"), ValueError, "dynamics"),
    # Methods are values now: a name is the wrong type.
    (lambda: dict(control="dropout"), TypeError, "control"),
    (lambda: dict(init_logits=(0.0, float("inf"))), ValueError, "init_logits"),
    (lambda: dict(init_logits=(0.0, 1.0, 2.0)), ValueError, "init_logits"),
    (lambda: dict(dynamics="sampled", control=covrl.ClipHigher(0.2, 0.2)), ValueError,
     "clip_ratio_high"),
    (lambda: dict(dynamics="sampled", control=covrl.NoControl(clip_ratio=0.2,
                                                              clip_ratio_high=0.1)),
     ValueError, "clip_ratio_high"),
    (lambda: dict(dynamics="sampled", control=covrl.ClipCov(clip_ratio=None)), ValueError,
     "clip_ratio"),
    (lambda: dict(dynamics="grpo_exact", advantage="baseline"), ValueError, "grpo"),
    (lambda: dict(dynamics="sampled", control=covrl.KLCov(ppo_kl_coef=1.0),
                  require_annealing=True), ValueError, "annealing"),
    (lambda: dict(dynamics="sampled", control=covrl.KLCov(
        ppo_kl_coef=schedules.power_decay(1.0, 1.0)), step_size=0.1, require_annealing=True),
     ValueError, "annealing"),
    (lambda: dict(dtype="float16"), ValueError, "dtype"),
])
def test_bad_configs_raise(kwargs, error, match):
  with pytest.raises(error, match=match):
    tabular.TabularConfig(BANDIT, **kwargs())


def test_annealing_conditions_accepted_when_met():
  config = tabular.TabularConfig(
      BANDIT, dynamics="sampled",
      control=covrl.ClipCov(clip_cov_ratio=schedules.power_decay(0.1, 1.0), min_count=0),
      step_size=schedules.robbins_monro(0.1, 0.6), require_annealing=True)
  assert config.ratio_schedule.power == 1.0


def test_bad_bandit_inputs_fail_before_compilation():
  with pytest.raises(ValueError, match="K >= 2"):
    tabular.TabularConfig(bandits.Bandit((1.0,)))
  with pytest.raises(ValueError, match="finite"):
    tabular.TabularConfig(bandits.Bandit((1.0, np.nan)))
  with pytest.raises(TypeError, match="Bandit"):
    tabular.TabularConfig((1.0, 0.5))


def test_float64_needs_x64():
  config = tabular.TabularConfig(BANDIT, dtype="float64")
  with enable_x64(False):
    with pytest.raises(ValueError, match="enable_x64"):
      tabular.make_train(config)
    with pytest.raises(ValueError, match="enable_x64"):
      tabular.run(config, jax.random.split(jax.random.key(0), 2))


def test_run_checks_batch_shapes():
  config = tabular.TabularConfig(BANDIT, num_steps=2)
  keys = jax.random.split(jax.random.key(0), 3)
  with pytest.raises(ValueError, match="leading axis"):
    tabular.run(config, keys, tabular.hyperparams(config, step_size=[0.1, 0.2]))
  if len(jax.devices()) >= 2:
    with pytest.raises(ValueError, match="divide evenly"):
      tabular.run(config, keys, mesh=tabular.data_mesh(2))


def test_config_is_frozen_and_replace_revalidates():
  config = tabular.TabularConfig(BANDIT)
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.num_steps = 5
  with pytest.raises(ValueError):
    dataclasses.replace(config, step_size=0.0)

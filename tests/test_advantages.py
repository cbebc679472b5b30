"""GRPO advantages: the formula against a NumPy reference, groups of equal rewards exactly 0 (the
optimum's fixed point needs it), verl's own function on the same groups; the GeometricRamp
schedule the exact lab's continuation uses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import covrl
from covrl import schedules


def _reference(r, eps=1e-6, normalize_std=True):
  r = np.asarray(r, np.float64)
  centred = r - r.mean(-1, keepdims=True)
  if not normalize_std:
    return centred
  return centred / (r.std(-1, ddof=1, keepdims=True) + eps)


@pytest.mark.parametrize("normalize_std", [True, False])
def test_matches_the_formula_on_unequal_groups(normalize_std):
  r = np.random.default_rng(0).uniform(size=(64, 7)).astype(np.float32)
  got = covrl.grpo_advantages(jnp.asarray(r), normalize_std=normalize_std)
  np.testing.assert_allclose(got, _reference(r, normalize_std=normalize_std), rtol=2e-5,
                             atol=2e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("group", [2, 3, 5, 6, 7, 8, 33])
@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_equal_rewards_give_exactly_zero(dtype, group, eps):
  """Every group of equal rewards, whatever the value, group size, dtype and eps (0 included,
  where the formula divides 0 by 0)."""
  values = np.random.default_rng(group).uniform(-2, 2, size=512)
  r = jnp.asarray(np.repeat(values[:, None], group, 1), dtype)
  for normalize_std in (True, False):
    a = covrl.grpo_advantages(r, eps=eps, normalize_std=normalize_std)
    assert a.dtype == jnp.promote_types(dtype, jnp.float32)
    assert float(jnp.max(jnp.abs(a))) == 0.0


def test_the_formula_as_written_is_not_zero_on_equal_float32_groups():
  """Why the rule exists: the float32 mean of 3 equal values is an ulp off for about a third of
  values, and divided by std + 1e-6 that is no longer small."""
  values = np.random.default_rng(1).uniform(size=4096).astype(np.float32)
  r = jnp.asarray(np.repeat(values[:, None], 3, 1))
  naive = (r - r.mean(-1, keepdims=True)) / (r.std(-1, ddof=1, keepdims=True) + 1e-6)
  nonzero = int(jnp.sum(jnp.any(naive != 0, axis=-1)))
  assert nonzero > 500 and float(jnp.max(jnp.abs(naive))) > 0.01
  assert float(jnp.max(jnp.abs(covrl.grpo_advantages(r)))) == 0.0


def test_a_group_of_one_keeps_its_reward():
  r = jnp.asarray([[0.3], [1.0]])
  np.testing.assert_array_equal(covrl.grpo_advantages(r), r)


def test_verl_on_equal_groups():
  """verl 0.9.1's compute_grpo_outcome_advantage agrees with covrl on unequal groups and, on
  equal ones, has the ulp problem covrl removes (recorded, not asserted as a target)."""
  torch = pytest.importorskip("torch")
  core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
  group = 5
  rng = np.random.default_rng(2)
  values = rng.uniform(size=(256, 1)).astype(np.float32)
  unequal = rng.uniform(size=(256, group)).astype(np.float32)
  for r in (np.repeat(values, group, 1), unequal):
    n = r.size
    rewards = torch.zeros(n, 3)
    rewards[:, -1] = torch.tensor(r.reshape(-1))
    index = np.repeat(np.arange(r.shape[0]), group).astype(object)
    verl, _ = core_algos.compute_grpo_outcome_advantage(rewards, torch.ones(n, 3), index)
    verl = verl[:, -1].numpy().reshape(r.shape)
    ours = np.asarray(covrl.grpo_advantages(jnp.asarray(r)))
    if r is unequal:
      np.testing.assert_allclose(ours, verl, rtol=1e-4, atol=1e-5)
    else:
      assert np.all(ours == 0.0)
      assert np.any(verl != 0.0)  # verl leaves some equal groups nonzero


def test_geometric_ramp():
  ramp = schedules.GeometricRamp(0.3, 0.003, 100)
  t = np.array([0, 25, 50, 100, 1000])
  want = 0.3 * 0.01 ** np.minimum(t / 100, 1.0)
  np.testing.assert_allclose([float(ramp(s)) for s in t], want, rtol=1e-6)
  assert float(schedules.GeometricRamp(0.0, 0.0, 5)(3)) == 0.0
  assert schedules.upper_bound(ramp) == 0.3
  # a pytree: start and end vmap, steps is static
  ramps = (schedules.GeometricRamp(0.1, 0.01, 10), schedules.GeometricRamp(0.2, 0.2, 10))
  batch = jax.tree.map(lambda *x: jnp.stack([jnp.asarray(v) for v in x]), *ramps)
  np.testing.assert_allclose(jax.vmap(lambda r: r(5))(batch), [0.1 * 0.1**0.5, 0.2], rtol=1e-6)
  for bad in ((0.0, 0.1, 10), (0.1, -1.0, 10), (0.1, 0.01, 0), (float("inf"), 0.1, 3)):
    with pytest.raises(ValueError):
      schedules.GeometricRamp(*bad)

"""Bandit problems: validation, properties, reward noise, generators and the hard cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covrl.tabular import bandits


def test_k_armed_properties():
  b = bandits.Bandit((1.0, 0.9, 0.1))
  assert (b.num_states, b.num_actions, b.contextual) == (1, 3, False)
  np.testing.assert_array_equal(b.r, [[1.0, 0.9, 0.1]])
  np.testing.assert_array_equal(b.rho, [1.0])
  assert b.optimal_value == 1.0


def test_contextual_properties():
  b = bandits.Bandit([[0.0, 1.0], [2.0, 0.5], [0.3, 0.2]], state_probs=(0.5, 0.25, 0.25))
  assert (b.num_states, b.num_actions, b.contextual) == (3, 2, True)
  assert b.optimal_value == pytest.approx(0.5 * 1.0 + 0.25 * 2.0 + 0.25 * 0.3)
  np.testing.assert_allclose(bandits.Bandit(b.means).rho, np.full(3, 1 / 3))


def test_frozen_and_hashable():
  b = bandits.Bandit(np.array([0.2, 0.4]))
  with pytest.raises(AttributeError):
    b.noise = "gaussian"
  assert b == bandits.Bandit((0.2, 0.4)) and hash(b) == hash(bandits.Bandit((0.2, 0.4)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(means=(1.0,)), "K >= 2"),
        (dict(means=[[1.0], [2.0]]), "K >= 2"),
        (dict(means=(1.0, np.nan)), "finite"),
        (dict(means=(1.0, np.inf)), "finite"),
        (dict(means=np.zeros((2, 2, 2))), r"\[K\] or \[S, K\]"),
        (dict(means=(0.5, 1.5), noise="bernoulli"), r"\[0, 1\]"),
        (dict(means=(0.5, 1.0), noise="poisson"), "noise"),
        (dict(means=(0.5, 1.0), noise="gaussian", noise_scale=0.0), "noise_scale"),
        (dict(means=[[0.5, 1.0], [0.0, 1.0]], state_probs=(0.5, 0.6)), "sum to 1"),
        (dict(means=[[0.5, 1.0], [0.0, 1.0]], state_probs=(1.0, 0.0)), "positive"),
        (dict(means=[[0.5, 1.0], [0.0, 1.0]], state_probs=(1.0,)), "shape"),
    ],
)
def test_bad_bandits_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    bandits.Bandit(**kwargs)


def test_sampled_rewards_statistics():
  key = jax.random.key(0)
  n = 200_000
  actions = jnp.tile(jnp.arange(2), n // 2)
  states = jnp.zeros_like(actions)
  b = bandits.Bandit((0.2, 0.7), noise="bernoulli")
  rewards = np.asarray(bandits.sample_rewards(b, key, states, actions))
  assert set(np.unique(rewards)) <= {0.0, 1.0}
  for a, p in enumerate((0.2, 0.7)):
    mean = rewards[np.asarray(actions) == a].mean()
    assert abs(mean - p) < 5 * np.sqrt(p * (1 - p) / (n / 2))
  g = bandits.Bandit((0.2, 0.7), noise="gaussian", noise_scale=2.0)
  rewards = np.asarray(bandits.sample_rewards(g, key, states, actions))
  for a, m in enumerate((0.2, 0.7)):
    x = rewards[np.asarray(actions) == a]
    assert abs(x.mean() - m) < 5 * 2.0 / np.sqrt(n / 2)
    assert abs(x.std() - 2.0) < 0.05
  d = bandits.Bandit((0.2, 0.7))
  np.testing.assert_array_equal(bandits.sample_rewards(d, key, states[:4], actions[:4]),
                                np.float32([0.2, 0.7, 0.2, 0.7]))


def test_sampled_states_follow_state_probs():
  b = bandits.Bandit([[0.0, 1.0]] * 3, state_probs=(0.6, 0.3, 0.1))
  states = np.asarray(bandits.sample_states(b, jax.random.key(1), (100_000,)))
  np.testing.assert_allclose(np.bincount(states, minlength=3) / 100_000, b.rho, atol=0.01)
  assert np.all(np.asarray(bandits.sample_states(bandits.Bandit((0.0, 1.0)),
                                                 jax.random.key(1), (5,))) == 0)


def test_random_bandit_is_deterministic_and_in_range():
  a, b = bandits.random_bandit(3, 5, 4), bandits.random_bandit(3, 5, 4)
  assert a == b and a != bandits.random_bandit(4, 5, 4)
  assert a.r.shape == (4, 5) and np.all((a.r >= 0) & (a.r <= 1))
  assert bandits.random_bandit(0, 3, noise="bernoulli").noise == "bernoulli"
  with pytest.raises(ValueError):
    bandits.random_bandit(0, 1)
  with pytest.raises(ValueError):
    bandits.random_bandit(0, 3, 0)


def test_mei_bad_start():
  bandit, z0 = bandits.mei_bad_start()
  np.testing.assert_array_equal(bandit.r, [[1.0, 0.9, 0.1]])
  pi0 = np.exp(z0) / np.exp(z0).sum()
  np.testing.assert_allclose(pi0, [[0.01, 0.05, 0.94]], rtol=1e-12)

"""Regime diagnostics against independent NumPy references and float64 finite differences."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import covrl
from covrl import diagnostics

# float64 NumPy references and finite differences throughout (checked in float64).
pytestmark = pytest.mark.float64

# ------------------------------------------------------------------ covariance_concentration


def _np_concentration(cov, mask, fractions):
  """Written from the definition: rank valid finite c_i (stable), sum the positive parts."""
  cov = np.asarray(cov, np.float64).reshape(-1)
  valid = np.asarray(mask, bool).reshape(-1) & np.isfinite(cov)
  idx = np.flatnonzero(valid)
  order = idx[np.argsort(-cov[idx], kind="stable")]
  positive = np.maximum(cov, 0.0)
  total = positive[idx].sum()
  out = []
  for f in fractions:
    n = max(int(f * idx.size), 1)
    held = positive[order[:n]].sum()
    out.append(held / total if total > 0 else 0.0)
  return np.asarray(out)


def _random_batch(seed, shape=(16, 40), p_mask=0.8, ties=False):
  rng = np.random.default_rng(seed)
  cov = rng.standard_t(2, size=shape)  # heavy tails, like c_i
  if ties:
    cov = np.round(cov, 0)
  mask = rng.random(shape) < p_mask
  return cov, mask


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_concentration_matches_numpy(seed, ties, jit):
  cov, mask = _random_batch(seed, ties=ties)
  fractions = (0.002, 0.02, 0.1, 0.5, 1.0)
  fn = lambda c, m: diagnostics.covariance_concentration(c, m, fractions)
  fn = jax.jit(fn) if jit else fn
  got = np.asarray(fn(jnp.asarray(cov), jnp.asarray(mask)))
  np.testing.assert_allclose(got, _np_concentration(cov, mask, fractions), rtol=1e-12)
  assert got[-1] == pytest.approx(1.0)  # all tokens hold all of it


def test_concentration_ignores_masked_and_nonfinite_tokens():
  cov, mask = _random_batch(7)
  cov[0, 0], mask[0, 0] = 1e9, False  # masked: must not count
  cov[1, 1], mask[1, 1] = np.nan, True  # non-finite: left out, as in the selection
  cov[2, 2], mask[2, 2] = np.inf, True
  got = np.asarray(diagnostics.covariance_concentration(jnp.asarray(cov), jnp.asarray(mask),
                                                        (0.01, 0.2)))
  np.testing.assert_allclose(got, _np_concentration(cov, mask, (0.01, 0.2)), rtol=1e-12)


def test_concentration_closed_forms():
  # Equal positive c_i: the top n tokens hold n / N of it.
  cov = jnp.ones((4, 250))
  got = diagnostics.covariance_concentration(cov, jnp.ones((4, 250)), (0.002, 0.02))
  np.testing.assert_allclose(got, [2 / 1000, 20 / 1000], rtol=1e-12)
  # No positive c_i: 0 (not NaN); an empty mask: 0.
  neg = -jnp.ones((2, 5))
  np.testing.assert_array_equal(diagnostics.covariance_concentration(neg, jnp.ones((2, 5))), 0)
  np.testing.assert_array_equal(diagnostics.covariance_concentration(cov, jnp.zeros((4, 250))), 0)
  # One forking token holds everything: the floor of one token finds it.
  spike = jnp.zeros((8, 64)).at[3, 7].set(5.0)
  np.testing.assert_allclose(diagnostics.covariance_concentration(spike, jnp.ones((8, 64))), 1.0)


def test_concentration_counts_the_tokens_kl_cov_selects():
  cov, mask = _random_batch(3, shape=(32, 64))
  cov, mask = jnp.asarray(cov), jnp.asarray(mask)
  for k in (0.002, 0.02):
    chosen = covrl.kl_cov_select(cov, mask, ratio=k).mask
    held = float(jnp.sum(jnp.where(chosen, jnp.maximum(cov, 0.0), 0.0)))
    total = float(jnp.sum(jnp.where(mask, jnp.maximum(cov, 0.0), 0.0)))
    got = float(diagnostics.covariance_concentration(cov, mask, (k,))[0])
    assert got == pytest.approx(held / total, rel=1e-12)


def test_concentration_is_global_over_a_sharded_batch():
  cov, mask = _random_batch(11, shape=(64, 32))
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  spec = NamedSharding(mesh, P("data"))
  c, m = jax.device_put(jnp.asarray(cov), spec), jax.device_put(jnp.asarray(mask), spec)
  got = jax.jit(lambda c, m: diagnostics.covariance_concentration(c, m, (0.002, 0.02)))(c, m)
  np.testing.assert_allclose(got, _np_concentration(cov, mask, (0.002, 0.02)), rtol=1e-12)


@pytest.mark.parametrize("fractions, match", [((), "empty"), ((0.0,), "fraction"),
                                              ((1.5,), "fraction")])
def test_concentration_bad_fractions(fractions, match):
  with pytest.raises(ValueError, match=match):
    diagnostics.covariance_concentration(jnp.ones((2, 3)), jnp.ones((2, 3)), fractions)


def test_concentration_bad_shapes():
  with pytest.raises(ValueError, match="rank 2"):
    diagnostics.covariance_concentration(jnp.ones((6,)), jnp.ones((6,)))


# ---------------------------------------------------------------------------- tokens_in_band


@pytest.mark.parametrize("seed", range(3))
def test_tokens_in_band_matches_numpy(seed):
  cov, mask = _random_batch(seed)
  cov[0, :3] = [1.0, 5.0, 3.0]  # the band is open: 1 and 5 are out
  mask[0, :3] = True
  want = int(np.sum(mask & np.isfinite(cov) & (cov > 1.0) & (cov < 5.0)))
  got = jax.jit(diagnostics.tokens_in_band)(jnp.asarray(cov), jnp.asarray(mask), 1.0, 5.0)
  assert int(got) == want


# ------------------------------------------------------------------------ balance_coefficient


def test_balance_coefficient_matches_numpy():
  rng = np.random.default_rng(0)
  g = {"a": rng.normal(size=(3, 4)), "b": [rng.normal(size=5), rng.normal(size=())]}
  h = {"a": rng.normal(size=(3, 4)), "b": [rng.normal(size=5), rng.normal(size=())]}
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  want = flat(g) @ flat(h) / (flat(h) @ flat(h))
  got = jax.jit(diagnostics.balance_coefficient)(g, h)
  assert float(got) == pytest.approx(want, rel=1e-12)
  assert float(diagnostics.balance_coefficient(g, jax.tree.map(np.zeros_like, h))) == 0.0


def test_balance_coefficient_rejects_mismatched_trees():
  with pytest.raises(ValueError, match="structure"):
    diagnostics.balance_coefficient({"a": jnp.ones(2)}, {"b": jnp.ones(2)})
  with pytest.raises(ValueError, match="shape"):
    diagnostics.balance_coefficient({"a": jnp.ones(2)}, {"a": jnp.ones(3)})


def _tabular_policy(theta, states):
  return theta["logits"][states]


def _mlp_policy(theta, states):
  x = jax.nn.one_hot(states, theta["w1"].shape[0], dtype=jnp.float64)
  return jnp.tanh(x @ theta["w1"] + theta["b1"]) @ theta["w2"]


def _problem(policy, seed):
  """Tokens (s_i, a_i, A_i) sampled from a policy; PG loss and mean entropy as functions."""
  rng = np.random.default_rng(seed)
  num_states, num_actions, hidden = 5, 4, 6
  if policy is _tabular_policy:
    theta = {"logits": jnp.asarray(rng.normal(size=(num_states, num_actions)))}
  else:
    theta = {"w1": jnp.asarray(rng.normal(size=(num_states, hidden))),
             "b1": jnp.asarray(rng.normal(size=hidden) * 0.1),
             "w2": jnp.asarray(rng.normal(size=(hidden, num_actions)))}
  states = jnp.asarray(rng.integers(0, num_states, size=64))
  probs = np.asarray(jax.nn.softmax(policy(theta, states)))
  actions = jnp.asarray([rng.choice(num_actions, p=p / p.sum()) for p in probs])
  rewards = rng.normal(size=(num_states, num_actions)) + 2.0 * np.eye(num_states, num_actions)
  adv = jnp.asarray(rewards[np.asarray(states), np.asarray(actions)])
  adv = adv - adv.mean()

  def pg_loss(t):  # on-policy surrogate: its gradient is the policy gradient's
    logp = jax.nn.log_softmax(policy(t, states))
    return -jnp.mean(adv * jnp.take_along_axis(logp, actions[:, None], 1)[:, 0])

  def entropy(t):
    return jnp.mean(covrl.entropy(policy(t, states)))

  return theta, pg_loss, entropy


@pytest.mark.parametrize("policy", [_tabular_policy, _mlp_policy], ids=["tabular", "mlp"])
@pytest.mark.parametrize("seed", range(3))
def test_alpha_star_stops_the_first_order_entropy_change(policy, seed):
  theta, pg_loss, entropy = _problem(policy, seed)
  g_pg, g_h = jax.grad(pg_loss)(theta), jax.grad(entropy)(theta)
  g_bonus = jax.tree.map(jnp.negative, g_h)  # gradient of the bonus loss -H
  alpha = float(diagnostics.balance_coefficient(g_pg, g_h))

  def update(a):  # plain gradient descent on L_PG + a * (-H), per unit step size
    return jax.tree.map(lambda p, b: -(p + a * b), g_pg, g_bonus)

  def fd_slope(a, eps=1e-5):  # float64 central difference of H along the update
    d = update(a)
    shift = lambda s: jax.tree.map(lambda t, u: t + s * u, theta, d)
    return (float(entropy(shift(eps))) - float(entropy(shift(-eps)))) / (2 * eps)

  scale = float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(update(0.0)))))
  # At alpha*: the first-order change vanishes (to the finite difference's O(eps^2) error).
  assert abs(fd_slope(alpha)) <= 1e-8 * max(1.0, scale)
  # Away from it the slope is (alpha - alpha*) |grad H|^2: below, entropy falls; above, it rises.
  h2 = float(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g_h)))
  for delta in (-0.3, 0.3):
    assert fd_slope(alpha + delta) == pytest.approx(delta * h2, rel=1e-6, abs=1e-10)


# ----------------------------------------------------------------------------------- pass_at_k


def _np_pass_at_k(c, n, k):
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n", [1, 4, 16])
def test_pass_at_k_matches_binomials(n):
  correct = np.zeros((n + 1, n), bool)
  for c in range(n + 1):
    correct[c, :c] = True
  np.random.default_rng(n).permuted(correct, axis=1, out=correct)  # order does not matter
  for k in range(1, n + 1):
    got = np.asarray(jax.jit(diagnostics.pass_at_k, static_argnums=1)(jnp.asarray(correct), k))
    want = [_np_pass_at_k(c, n, k) for c in range(n + 1)]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_pass_at_k_edge_cases():
  correct = jnp.asarray([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
  np.testing.assert_allclose(diagnostics.pass_at_k(correct, 1), [0.5, 0.0, 1.0])
  np.testing.assert_allclose(diagnostics.pass_at_k(correct, 3), [1.0, 0.0, 1.0])  # n - c < k
  for bad in (0, 5, 1.0, True):
    with pytest.raises(ValueError, match="k must be"):
      diagnostics.pass_at_k(correct, bad)
  with pytest.raises(ValueError, match="prompts, samples"):
    diagnostics.pass_at_k(jnp.ones(4), 1)

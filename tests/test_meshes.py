"""Every public [B, T] function under jit on an 8-device mesh of each axis type against one
device: Explicit axes (what `jax.make_mesh` gives by default) and Auto axes, called as the manual
(docs/guides/devices.md) says (arrays put on the mesh, no mesh context) and inside
`jax.set_mesh`."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import covrl

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

B, T, V = 16, 12, 5


def batch():
  rng = np.random.default_rng(0)
  old = -rng.exponential(size=(B, T)).astype(np.float32)
  new = (old + 0.2 * rng.normal(size=(B, T))).astype(np.float32)
  adv = rng.normal(size=(B, T)).astype(np.float32)
  mask = (rng.random((B, T)) > 0.2).astype(np.float32)
  logits = rng.normal(size=(B, T, V)).astype(np.float32)
  dz = 0.1 * rng.normal(size=(B, T, V)).astype(np.float32)
  return old, new, adv, mask, logits, dz


KEY = jax.random.key(3)
CASES = {
    "policy_loss NoControl": lambda o, n, a, m, z, d: covrl.policy_loss(covrl.NoControl(), o, n,
                                                                        a, m),
    "policy_loss EntropyBonus": lambda o, n, a, m, z, d: covrl.policy_loss(
        covrl.EntropyBonus(0.01), o, n, a, m, logits=z, logit_update=d),
    "policy_loss ClipHigher": lambda o, n, a, m, z, d: covrl.policy_loss(covrl.ClipHigher(), o,
                                                                         n, a, m),
    "clip_cov_loss": lambda o, n, a, m, z, d: covrl.clip_cov_loss(
        o, n, a, m, key=KEY, clip_cov_ratio=0.1, clip_cov_lb=0.0, clip_cov_ub=5.0),
    "kl_cov_loss": lambda o, n, a, m, z, d: covrl.kl_cov_loss(o, n, a, m, kl_cov_ratio=0.1),
    "ppo_loss seq-mean-token-mean": lambda o, n, a, m, z, d: covrl.ppo_loss(
        o, n, a, m, loss_agg_mode="seq-mean-token-mean"),
    "policy_gradient_loss": lambda o, n, a, m, z, d: covrl.policy_gradient_loss(o, n, a, m),
    "entropy_bonus_loss": lambda o, n, a, m, z, d: covrl.entropy_bonus_loss(z, m, coef=0.1),
    "token_covariance": lambda o, n, a, m, z, d: covrl.token_covariance(n, a, m),
    "kl_cov_select": lambda o, n, a, m, z, d: covrl.kl_cov_select(
        covrl.token_covariance(n, a, m), m, ratio=0.05),
    "clip_cov_select": lambda o, n, a, m, z, d: covrl.clip_cov_select(
        covrl.token_covariance(n, a, m), m, key=KEY, ratio=0.1, lb=0.0, ub=5.0),
    "select_tokens": lambda o, n, a, m, z, d: covrl.select_tokens(
        covrl.ClipCov(clip_cov_ratio=0.1, clip_cov_lb=0.0),
        covrl.policy_tokens(o, n, a, m), covrl.ClipCov().surrogate(covrl.policy_tokens(o, n, a, m)),
        key=KEY),
    "aggregate": lambda o, n, a, m, z, d: covrl.aggregate(n * a, m, "seq-mean-token-sum"),
    "denominator": lambda o, n, a, m, z, d: covrl.denominator(m, "seq-mean-token-mean"),
    "masked_mean": lambda o, n, a, m, z, d: covrl.masked_mean(n, m),
    "entropy": lambda o, n, a, m, z, d: covrl.entropy(z),
    "entropy_change": lambda o, n, a, m, z, d: covrl.entropy_change(z, d),
    "entropy_change_integral": lambda o, n, a, m, z, d: covrl.entropy_change_integral(z, d),
    "pooled_entropy": lambda o, n, a, m, z, d: covrl.pooled_entropy(z, m),
    "pooled_entropy_change": lambda o, n, a, m, z, d: covrl.pooled_entropy_change(z, d, m,
                                                                                  order=2),
    "grpo_advantages": lambda o, n, a, m, z, d: covrl.grpo_advantages(a),
    "policy_loss ForkingTokens": lambda o, n, a, m, z, d: covrl.policy_loss(
        covrl.ForkingTokens(0.3), o, n, a, m, logits=z),
    "policy_loss EntropyAdvantage": lambda o, n, a, m, z, d: covrl.policy_loss(
        covrl.EntropyAdvantage(), o, n, a, m, logits=z),
    "policy_loss WReinforce": lambda o, n, a, m, z, d: covrl.policy_loss(covrl.WReinforce(), o,
                                                                         n, a, m),
    "policy_loss STEER": lambda o, n, a, m, z, d: covrl.policy_loss(covrl.STEER(0.5), o, n, a, m,
                                                                    logits=z),
    "high_entropy_select": lambda o, n, a, m, z, d: covrl.high_entropy_select(
        covrl.entropy(z), m, top_entropy_quantile=0.2),
}


def _compare(got, want):
  chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g), np.asarray(w)
    if g.dtype == bool or np.issubdtype(g.dtype, np.integer):
      np.testing.assert_array_equal(g, w)
    else:
      np.testing.assert_allclose(g, w, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
@pytest.mark.parametrize("name", list(CASES))
def test_sharded_equals_one_device(name, axis_type):
  """The manual's recipe as written: the arrays put on the mesh with NamedSharding, the jitted
  call on the global arrays, no `jax.set_mesh` around it."""
  args = [jnp.asarray(x) for x in batch()]
  fn = jax.jit(CASES[name])
  want = fn(*args)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  sharded = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in args]
  _compare(fn(*sharded), want)


# The cases whose exact global selection gathers the scores (the path that needed a mesh
# context before it resharded onto the array's own mesh).
SELECTING = ["clip_cov_loss", "kl_cov_loss", "select_tokens", "policy_loss ForkingTokens",
             "high_entropy_select"]


@pytest.mark.parametrize("name", SELECTING)
def test_default_make_mesh_inside_set_mesh(name):
  """`jax.make_mesh` with its default (Explicit) axes, called inside `jax.set_mesh` too."""
  mesh = jax.make_mesh((8,), ("data",))
  args = [jnp.asarray(x) for x in batch()]
  fn = jax.jit(CASES[name])
  want = fn(*args)
  with jax.set_mesh(mesh):
    got = fn(*[jax.device_put(x, NamedSharding(mesh, P("data"))) for x in args])
  _compare(got, want)

"""Token covariance and Clip-Cov / KL-Cov selection against NumPy references, on 1 and 8 devices."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import covrl
from covrl import selection


def np_token_cov(lp, adv, mask):
  m = mask.astype(bool)
  c = (lp - lp[m].mean()) * (adv - adv[m].mean())
  return np.where(m, c, 0.0)


def np_count(ratio, n, min_count=1):
  return max(int(ratio * n), min_count)


def np_kl_select(cov, mask, ratio):
  """Reference: stable sort by -c over valid tokens in row-major order, keep the first count."""
  flat_c, flat_m = cov.ravel(), mask.ravel().astype(bool)
  idx = np.flatnonzero(flat_m)
  order = idx[np.argsort(-flat_c[idx], kind="stable")]
  out = np.zeros(flat_c.size, bool)
  out[order[: np_count(ratio, flat_m.sum())]] = True
  return out.reshape(cov.shape)


def batch(seed, b=8, t=16, p_mask=0.2, dtype=np.float32):
  rng = np.random.default_rng(seed)
  lp = -rng.exponential(size=(b, t)).astype(dtype)
  adv = rng.normal(size=(b, t)).astype(dtype)
  mask = (rng.random((b, t)) > p_mask).astype(dtype)
  return lp, adv, mask


def mesh8():
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.mark.float64
def test_token_covariance_matches_numpy():
  lp, adv, mask = batch(0, dtype=np.float64)
  np.testing.assert_allclose(covrl.token_covariance(lp, adv, mask), np_token_cov(lp, adv, mask),
                             atol=1e-12)


@pytest.mark.float64
def test_token_covariance_leaves_out_nonfinite_tokens():
  lp, adv, mask = batch(1, dtype=np.float64)
  lp[0, 0], adv[1, 1] = np.nan, np.inf
  mask[0, 0] = mask[1, 1] = 1
  c = np.asarray(jax.jit(covrl.token_covariance)(lp, adv, mask))
  clean = mask.copy()
  clean[0, 0] = clean[1, 1] = 0
  np.testing.assert_allclose(c, np_token_cov(np.nan_to_num(lp), np.nan_to_num(adv), clean),
                             atol=1e-12)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([2e-4, 2e-3, 1e-3, 0.1, 0.3, 1 / 3, 0.7, 1e-5, 0.5, 1.0]),
       st.integers(0, 200_000))
def test_count_follows_python_float_semantics(ratio, n):
  count, bound = selection.selection_count(ratio, jnp.int32(n), capacity=200_000)
  assert int(count) == min(np_count(ratio, n), bound)
  assert bound == max(int(ratio * 200_000), 1)


def test_count_with_traced_ratio_needs_bound():
  with pytest.raises(ValueError, match="max_ratio"):
    jax.jit(lambda r: selection.selection_count(r, jnp.int32(10), capacity=10)[0])(0.5)
  f = jax.jit(lambda r: selection.selection_count(r, jnp.int32(1000), capacity=1000,
                                                  max_ratio=0.1)[0])
  assert int(f(0.05)) == 50 and int(f(0.0)) == 1


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5, 1.0])
def test_kl_cov_select_matches_stable_sort_reference(ratio):
  lp, adv, mask = batch(2)
  cov = np.asarray(covrl.token_covariance(lp, adv, mask))
  got = np.asarray(jax.jit(lambda c, m: covrl.kl_cov_select(c, m, ratio=ratio).mask)(cov, mask))
  np.testing.assert_array_equal(got, np_kl_select(cov, mask, ratio))


def test_kl_cov_ties_go_to_lower_flat_index():
  cov = np.zeros((2, 4), np.float32)
  cov[1, 0] = cov[0, 3] = cov[1, 3] = 1.0
  got = np.asarray(covrl.kl_cov_select(cov, np.ones((2, 4)), ratio=2 / 8).mask)
  expected = np.zeros((2, 4), bool)
  expected[0, 3] = expected[1, 0] = True
  np.testing.assert_array_equal(got, expected)


def test_clip_cov_select_keeps_count_inside_band():
  lp, adv, mask = batch(3, b=16, t=32)
  cov = np.asarray(covrl.token_covariance(lp, adv, mask))
  eligible = np.random.default_rng(0).random(cov.shape) > 0.3
  lb, ub = 0.1, 1.5
  cands = mask.astype(bool) & eligible & (cov > lb) & (cov < ub)
  for ratio in (0.01, 0.05, 1.0):
    got = np.asarray(covrl.clip_cov_select(cov, mask, key=jax.random.key(0), ratio=ratio, lb=lb,
                                           ub=ub, eligible=eligible).mask)
    assert got.sum() == min(np_count(ratio, mask.sum()), cands.sum())
    assert not (got & ~cands).any()


def test_clip_cov_select_draw_is_uniform_over_candidates():
  """Each of n candidates is kept with probability count/n: binomial check over many keys."""
  cov = np.full((1, 40), 2.0, np.float32)
  cov[0, ::2] = 0.0  # 20 candidates in the band (1, 5)
  mask = np.ones((1, 40), np.float32)
  draws = 4000
  keys = jax.random.split(jax.random.key(1), draws)
  sel = jax.vmap(lambda k: covrl.clip_cov_select(cov, mask, key=k, ratio=0.1, lb=1.0,
                                                 ub=5.0).mask)(keys)
  freq = np.asarray(sel).mean(0)[0]
  np.testing.assert_array_equal(freq[::2], 0.0)
  p = 4 / 20  # count = floor(0.1 * 40) = 4 of 20 candidates
  sd = np.sqrt(p * (1 - p) / draws)
  assert np.all(np.abs(freq[1::2] - p) < 5 * sd)


def test_same_key_same_selection_and_different_keys_differ():
  cov = np.full((4, 64), 2.0, np.float32)
  mask = np.ones_like(cov)
  f = lambda k: covrl.clip_cov_select(cov, mask, key=k, ratio=0.05, lb=1.0, ub=5.0).mask
  a, b, c = f(jax.random.key(3)), f(jax.random.key(3)), f(jax.random.key(4))
  np.testing.assert_array_equal(a, b)
  assert (np.asarray(a) != np.asarray(c)).any()


def test_all_masked_selects_nothing():
  cov = np.ones((2, 3), np.float32) * 2
  mask = np.zeros((2, 3), np.float32)
  assert not np.asarray(covrl.kl_cov_select(cov, mask, ratio=0.5).mask).any()
  assert not np.asarray(covrl.clip_cov_select(cov, mask, key=jax.random.key(0), ratio=0.5, lb=1.0,
                                              ub=5.0).mask).any()


def test_nan_covariance_is_never_selected():
  cov = np.array([[np.nan, 1.0, 0.5, 3.0]], np.float32)
  # The NaN token is not counted either: count = floor(0.7 * 3) = 2.
  got = np.asarray(jax.jit(lambda c: covrl.kl_cov_select(c, jnp.ones((1, 4)), ratio=0.7).mask)(cov))
  np.testing.assert_array_equal(got, [[False, True, False, True]])


@pytest.mark.parametrize("bad", [
    dict(ratio=1.5), dict(ratio=-0.1), dict(lb=2.0, ub=1.0), dict(lb=1.0, ub=1.0),
])
def test_bad_hyperparameters_raise(bad):
  kwargs = dict(ratio=0.1, lb=1.0, ub=5.0) | bad
  with pytest.raises(ValueError):
    covrl.clip_cov_select(np.ones((2, 2), np.float32), np.ones((2, 2)), key=jax.random.key(0),
                          **kwargs)


def test_mask_must_be_zero_one_and_shapes_match():
  with pytest.raises(ValueError, match="only 0 and 1"):
    covrl.kl_cov_select(np.ones((2, 2), np.float32), np.full((2, 2), 2.0), ratio=0.5)
  with pytest.raises(ValueError, match="shape mismatch"):
    covrl.kl_cov_select(np.ones((2, 2), np.float32), np.ones((2, 3)), ratio=0.5)
  with pytest.raises(ValueError, match="rank 2"):
    covrl.kl_cov_select(np.ones((4,), np.float32), np.ones((4,)), ratio=0.5)


def _shard_map_select(kind, cov, mask, key, **kw):
  mesh = mesh8()

  def local(c, m):
    if kind == "kl":
      return covrl.kl_cov_select(c, m, axis_name="data", **kw).mask
    return covrl.clip_cov_select(c, m, key=key, axis_name="data", **kw).mask

  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")),
                            out_specs=P("data")))
  return f(cov, mask)


@pytest.mark.parametrize("kind", ["kl", "clip"])
@pytest.mark.parametrize("ratio", [0.01, 0.2, 1.0])
def test_global_selection_is_identical_on_one_and_eight_devices(kind, ratio):
  lp, adv, mask = batch(5, b=16, t=24)
  key = jax.random.key(7)
  kw = dict(ratio=ratio) if kind == "kl" else dict(ratio=ratio, lb=0.05, ub=2.0)
  cov = covrl.token_covariance(lp, adv, mask)
  if kind == "kl":
    one = covrl.kl_cov_select(cov, mask, **kw).mask
  else:
    one = covrl.clip_cov_select(cov, mask, key=key, **kw).mask
  assert np.asarray(one).any()
  # shard_map with an axis name: local covariance statistics and top-k made global.
  mesh = mesh8()

  def local(l, a, m):
    c = covrl.token_covariance(l, a, m, axis_name="data")
    if kind == "kl":
      return covrl.kl_cov_select(c, m, axis_name="data", **kw).mask
    return covrl.clip_cov_select(c, m, key=key, axis_name="data", **kw).mask

  sm = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P("data")))
  np.testing.assert_array_equal(sm(lp, adv, mask), one)
  # jit over NamedSharding-sharded global arrays.
  sharding = NamedSharding(mesh, P("data"))
  args = [jax.device_put(x, sharding) for x in (lp, adv, mask)]

  def glob(l, a, m):
    c = covrl.token_covariance(l, a, m)
    if kind == "kl":
      return covrl.kl_cov_select(c, m, **kw).mask
    return covrl.clip_cov_select(c, m, key=key, **kw).mask

  np.testing.assert_array_equal(jax.jit(glob)(*args), one)


def test_kl_cov_ties_across_devices_follow_global_index():
  cov = np.zeros((8, 2), np.float32)
  cov[[1, 3, 6], 1] = 1.0
  mask = np.ones_like(cov)
  got = _shard_map_select("kl", cov, mask, None, ratio=2 / 16)
  expected = np.zeros((8, 2), bool)
  expected[[1, 3], 1] = True
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("size, k", [(100, 3), (4096, 7), (50_000, 13), (100_003, 40), (8192, 128)])
def test_two_level_top_k_equals_lax_top_k_including_ties(size, k):
  rng = np.random.default_rng(size)
  # Few distinct values (many ties) and -inf entries, the hard cases for tie-breaking.
  x = rng.integers(0, 50, size).astype(np.float32)
  x[rng.random(size) < 0.3] = -np.inf
  for values in (x, rng.normal(size=size).astype(np.float32), np.full(size, -np.inf, np.float32)):
    want_v, want_i = jax.lax.top_k(values, k)
    got_v, got_i = jax.jit(selection.top_k, static_argnums=1)(values, k)
    np.testing.assert_array_equal(got_v, want_v)
    finite = np.isfinite(np.asarray(want_v))
    np.testing.assert_array_equal(np.asarray(got_i)[finite], np.asarray(want_i)[finite])
  assert selection._group_size(size, k) > 1 or size < 64 * k


@pytest.mark.parametrize("kind", ["kl", "clip"])
@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.3, 1.0])
def test_selection_count_equals_mask_sum_on_one_and_eight_devices(kind, ratio):
  """The count read off the top-K list is the mask's sum, per device under shard_map."""
  lp, adv, mask = batch(11, b=16, t=24)
  key = jax.random.key(3)
  kw = dict(ratio=ratio)
  if kind == "clip":
    kw.update(lb=0.05, ub=2.0)

  def select(c, m, **extra):
    if kind == "kl":
      return covrl.kl_cov_select(c, m, **kw, **extra)
    return covrl.clip_cov_select(c, m, key=key, **kw, **extra)

  chosen, num = select(covrl.token_covariance(lp, adv, mask), mask)
  assert int(num) == int(np.asarray(chosen).sum()) > 0
  assert num.dtype == jnp.int32 and num.shape == ()

  def local(l, a, m):
    c = covrl.token_covariance(l, a, m, axis_name="data")
    chosen, num = select(c, m, axis_name="data")
    return chosen, num[None]

  sm = jax.jit(jax.shard_map(local, mesh=mesh8(), in_specs=(P("data"),) * 3,
                             out_specs=(P("data"), P("data"))))
  chosen8, num8 = sm(lp, adv, mask)
  np.testing.assert_array_equal(chosen8, chosen)
  per_device = np.asarray(chosen8).reshape(8, -1).sum(axis=1)
  np.testing.assert_array_equal(num8, per_device)

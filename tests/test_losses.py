"""Policy losses against independent NumPy references of verl's semantics; gradients; devices."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _numeric import central_difference
from absl.testing import parameterized
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import covrl

MODES = covrl.LOSS_AGG_MODES


# ---------------------------------------------------------------- NumPy references (float64)
def np_agg(loss, mask, mode, horizon=None):
  m = mask.astype(bool)
  if mode == "token-mean":
    return np.where(m, loss, 0).sum() / max(m.sum(), 1)
  if mode == "token-sum":
    return np.where(m, loss, 0).sum()
  rows = [i for i in range(loss.shape[0]) if m[i].any()]
  if not rows:
    return 0.0
  per_seq = []
  for i in rows:
    s = loss[i][m[i]].sum()
    if mode == "seq-mean-token-mean":
      s = s / m[i].sum()
    elif mode == "seq-mean-token-sum-norm":
      s = s / (loss.shape[1] if horizon is None else horizon)
    per_seq.append(s)
  return float(np.mean(per_seq))


def np_ppo(old, new, adv, low, high, c=None):
  ratio = np.exp(np.clip(new - old, -20, 20))
  l1, l2 = -adv * ratio, -adv * np.clip(ratio, 1 - low, 1 + high)
  loss = np.maximum(l1, l2)
  if c is not None:
    loss = np.where(adv < 0, np.minimum(loss, -adv * c), loss)
  return loss, l2 > l1


def np_cov(lp, adv, mask):
  m = mask.astype(bool)
  return np.where(m, (lp - lp[m].mean()) * (adv - adv[m].mean()), 0.0)


def np_kl_cov(old, new, adv, mask, ratio, coef):
  ratio_ = np.exp(np.clip(new - old, -20, 20))
  loss = -adv * ratio_
  m = mask.astype(bool)
  c = np_cov(new, adv, mask).ravel()
  idx = np.flatnonzero(m.ravel())
  top = idx[np.argsort(-c[idx], kind="stable")][: max(int(ratio * m.sum()), 1)]
  flat = loss.ravel().copy()
  flat[top] += coef * np.abs(new - old).ravel()[top]
  return flat.reshape(loss.shape), top


def tokens(seed, b=6, t=10, dtype=np.float64, p_mask=0.25):
  rng = np.random.default_rng(seed)
  new = -rng.exponential(size=(b, t))
  old = new + 0.3 * rng.normal(size=(b, t))
  adv = rng.normal(size=(b, t))
  mask = (rng.random((b, t)) > p_mask).astype(np.float64)
  mask[0] = 0.0  # an empty sequence
  return [x.astype(dtype) for x in (old, new, adv, mask)]


# ---------------------------------------------------------------- values
@pytest.mark.float64
@pytest.mark.parametrize("mode", MODES)
def test_policy_gradient_loss_matches_reference(mode):
  old, new, adv, mask = tokens(0)
  loss, m = covrl.policy_gradient_loss(old, new, adv, mask, loss_agg_mode=mode)
  ref = np_agg(-adv * np.exp(new - old), mask, mode)
  np.testing.assert_allclose(loss, ref, rtol=1e-12)
  np.testing.assert_allclose(m["approx_kl"], (old - new)[mask > 0].mean(), rtol=1e-12)


@pytest.mark.float64
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("low, high, c", [(0.2, 0.2, 3.0), (0.2, 0.28, 3.0), (0.1, 0.3, None)])
def test_ppo_loss_matches_reference(mode, low, high, c):
  old, new, adv, mask = tokens(1)
  loss, m = covrl.ppo_loss(old, new, adv, mask, clip_ratio_low=low, clip_ratio_high=high,
                           clip_ratio_c=c, loss_agg_mode=mode)
  ref_mat, clipped = np_ppo(old, new, adv, low, high, c)
  np.testing.assert_allclose(loss, np_agg(ref_mat, mask, mode), rtol=1e-12)
  np.testing.assert_allclose(m["clip_frac"], clipped[mask > 0].mean(), rtol=1e-12)
  assert 0 < m["clip_frac"] < 1


@pytest.mark.float64
def test_seq_mean_token_sum_norm_uses_horizon():
  old, new, adv, mask = tokens(2)
  loss, _ = covrl.ppo_loss(old, new, adv, mask, loss_agg_mode="seq-mean-token-sum-norm",
                           horizon=64)
  np.testing.assert_allclose(
      loss, np_agg(np_ppo(old, new, adv, .2, .2, 3.0)[0], mask, "seq-mean-token-sum-norm", 64),
      rtol=1e-12)


@pytest.mark.float64
@pytest.mark.parametrize("mode", MODES)
def test_kl_cov_loss_matches_reference(mode):
  old, new, adv, mask = tokens(3)
  loss, m = covrl.kl_cov_loss(old, new, adv, mask, kl_cov_ratio=0.1, ppo_kl_coef=0.7,
                              loss_agg_mode=mode)
  ref_mat, top = np_kl_cov(old, new, adv, mask, 0.1, 0.7)
  np.testing.assert_allclose(loss, np_agg(ref_mat, mask, mode), rtol=1e-12)
  np.testing.assert_allclose(m["selected_frac"], len(top) / mask.sum(), rtol=1e-12)


@pytest.mark.float64
@pytest.mark.parametrize("mode", MODES)
def test_clip_cov_loss_matches_reference_when_every_candidate_is_detached(mode):
  old, new, adv, mask = tokens(4)
  lb, ub = 0.05, 3.0
  loss, m = covrl.clip_cov_loss(old, new, adv, mask, key=jax.random.key(0), clip_cov_ratio=1.0,
                                clip_cov_lb=lb, clip_cov_ub=ub, loss_agg_mode=mode)
  ref_mat, clipped = np_ppo(old, new, adv, .2, .2)
  c = np_cov(new, adv, mask)
  detached = (mask > 0) & ~clipped & (c > lb) & (c < ub)
  assert detached.any()
  np.testing.assert_allclose(loss, np_agg(np.where(detached, 0, ref_mat), mask, mode),
                             rtol=1e-12)
  np.testing.assert_allclose(m["selected_frac"], detached.sum() / mask.sum(), rtol=1e-12)


def test_clip_cov_detaches_count_tokens_from_band():
  old, new, adv, mask = tokens(5, b=16, t=32)
  c = np_cov(new, adv, mask)
  _, clipped = np_ppo(old, new, adv, .2, .2)
  cands = (mask > 0) & ~clipped & (c > 0.05) & (c < 3.0)
  _, m = covrl.clip_cov_loss(old, new, adv, mask, clip_cov_ratio=0.02,
                             clip_cov_lb=0.05, clip_cov_ub=3.0, key=jax.random.key(1))
  count = min(max(int(0.02 * mask.sum()), 1), cands.sum())
  np.testing.assert_allclose(m["selected_frac"] * mask.sum(), count)


@pytest.mark.float64
def test_entropy_bonus_loss_matches_reference():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(3, 4, 5)) * 2
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], np.float64)
  temp = 0.7
  z = logits / temp
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  h = -(p * np.log(p)).sum(-1)
  for mode in MODES:
    loss, m = covrl.entropy_bonus_loss(logits, mask, coef=0.01, temperature=temp,
                                       loss_agg_mode=mode)
    np.testing.assert_allclose(loss, -0.01 * np_agg(h, mask, mode), rtol=1e-12)
    np.testing.assert_allclose(m["entropy"], np_agg(h, mask, mode), rtol=1e-12)


def test_entropy_bonus_schedule_needs_step():
  sched = covrl.schedules.inverse_time(0.1, 10.0)
  logits, mask = np.zeros((1, 2, 3)), np.ones((1, 2))
  with pytest.raises(ValueError, match="step"):
    covrl.entropy_bonus_loss(logits, mask, coef=sched)
  loss, m = covrl.entropy_bonus_loss(logits, mask, coef=sched, step=10)
  np.testing.assert_allclose(m["entropy_coef"], 0.05, rtol=1e-6)
  np.testing.assert_allclose(loss, -0.05 * np.log(3), rtol=1e-6)


# ---------------------------------------------------------------- gradients
fd = central_difference


@pytest.mark.float64
@pytest.mark.parametrize("name", ["pg", "ppo", "kl_cov", "clip_cov"])
def test_gradients_match_finite_differences(name):
  old, new, adv, mask = tokens(7, b=3, t=5)
  key = jax.random.key(0)
  fns = {
      "pg": lambda lp: covrl.policy_gradient_loss(old, lp, adv, mask)[0],
      "ppo": lambda lp: covrl.ppo_loss(old, lp, adv, mask)[0],
      "kl_cov": lambda lp: covrl.kl_cov_loss(old, lp, adv, mask, kl_cov_ratio=0.2,
                                             ppo_kl_coef=0.5)[0],
      # Selection fixed, so the loss is a smooth function of log_prob for finite differences.
      "clip_cov": lambda lp: covrl.clip_cov_loss(old, lp, adv, mask, selected=sel)[0],
  }
  sel = covrl.clip_cov_select(covrl.token_covariance(new, adv, mask), mask, ratio=0.3,
                              lb=0.0, ub=10.0, key=key).mask
  f = fns[name]
  g = jax.grad(f)(jnp.asarray(new))
  np.testing.assert_allclose(g, fd(lambda x: float(f(x)), new), atol=1e-7)
  assert np.all(np.asarray(g)[mask == 0] == 0)


def test_kl_cov_is_inert_on_policy():
  """|x|'(0) = 0: with log pi = log pi_old the gradient equals the policy gradient's."""
  _, new, adv, mask = tokens(8)
  g_kl = jax.grad(lambda lp: covrl.kl_cov_loss(jax.lax.stop_gradient(lp), lp, adv, mask,
                                               kl_cov_ratio=0.5, ppo_kl_coef=1.0)[0])(new)
  g_pg = jax.grad(lambda lp: covrl.policy_gradient_loss(jax.lax.stop_gradient(lp), lp, adv,
                                                        mask)[0])(new)
  np.testing.assert_array_equal(g_kl, g_pg)
  # jnp.abs would not be inert: its derivative at 0 is 1 in JAX.
  assert float(jax.grad(jnp.abs)(0.0)) == 1.0
  assert float(jax.grad(covrl.abs_zero_grad_at_zero)(0.0)) == 0.0


def test_kl_cov_acts_off_policy():
  old, new, adv, mask = tokens(9)
  g_kl = jax.grad(lambda lp: covrl.kl_cov_loss(old, lp, adv, mask, kl_cov_ratio=0.5,
                                               ppo_kl_coef=1.0)[0])(new)
  g_pg = jax.grad(lambda lp: covrl.policy_gradient_loss(old, lp, adv, mask)[0])(new)
  assert np.abs(np.asarray(g_kl - g_pg)).max() > 1e-3


# ---------------------------------------------------------------- bad input
def test_all_masked_batch_gives_zero_loss_and_zero_gradient():
  old, new, adv, _ = tokens(10)
  mask = np.zeros_like(new)
  fns = [
      lambda lp: covrl.ppo_loss(old, lp, adv, mask)[0],
      lambda lp: covrl.kl_cov_loss(old, lp, adv, mask)[0],
      lambda lp: covrl.clip_cov_loss(old, lp, adv, mask, key=jax.random.key(0))[0],
  ]
  for f in fns:
    value, g = jax.value_and_grad(f)(jnp.asarray(new))
    assert float(value) == 0.0 and np.all(np.asarray(g) == 0)
  logits = jnp.ones((*new.shape, 4))
  value, g = jax.value_and_grad(lambda z: covrl.entropy_bonus_loss(z, mask, coef=0.1)[0])(logits)
  assert float(value) == 0.0 and np.all(np.asarray(g) == 0)


def test_padding_may_hold_anything():
  old, new, adv, mask = tokens(11)
  dirty = [x.copy() for x in (old, new, adv)]
  for x in dirty:
    x[mask == 0] = np.nan
  clean_loss, _ = covrl.ppo_loss(old, new, adv, mask)
  loss, _ = covrl.ppo_loss(*dirty, mask)
  np.testing.assert_allclose(loss, clean_loss, rtol=1e-12)
  g = jax.grad(lambda lp: covrl.kl_cov_loss(dirty[0], lp, dirty[2], mask)[0])(dirty[1])
  assert np.all(np.isfinite(np.asarray(g)))
  logits = np.random.default_rng(0).normal(size=(*mask.shape, 4))
  logits[mask == 0] = -np.inf  # rows that would be undefined, at padding only
  g = jax.grad(lambda z: covrl.entropy_bonus_loss(z, mask, coef=0.1)[0])(jnp.asarray(logits))
  assert np.all(np.isfinite(np.asarray(g)))


def test_nan_at_valid_token_raises_eagerly_and_is_reported_under_jit():
  old, new, adv, mask = tokens(12)
  i = tuple(np.argwhere(mask > 0)[0])
  bad = new.copy()
  bad[i] = np.nan
  with pytest.raises(ValueError, match="non-finite"):
    covrl.kl_cov_loss(old, bad, adv, mask)
  loss, m = jax.jit(lambda lp: covrl.kl_cov_loss(old, lp, adv, mask, kl_cov_ratio=1.0))(bad)
  assert int(m["nonfinite_tokens"]) == 1 and np.isfinite(float(loss))
  g = jax.grad(lambda lp: jax.jit(covrl.kl_cov_loss)(old, lp, adv, mask)[0])(bad)
  assert np.all(np.isfinite(np.asarray(g)))


def test_minus_inf_vocabulary_entries_give_finite_bonus_gradient():
  logits = np.random.default_rng(1).normal(size=(2, 3, 5))
  logits[..., 0] = -np.inf
  g = jax.grad(lambda z: covrl.entropy_bonus_loss(z, np.ones((2, 3)), coef=1.0)[0])(
      jnp.asarray(logits))
  assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(g)[..., 0] == 0)


@pytest.mark.parametrize("call, error, match", [
    (lambda t: covrl.ppo_loss(*t[:3], t[3][:, :-1]), ValueError, "shape mismatch"),
    (lambda t: covrl.ppo_loss(t[0], t[1].astype(np.int32), *t[2:]), TypeError, "floating"),
    (lambda t: covrl.ppo_loss(*t[:3], t[3] * 2), ValueError, "only 0 and 1"),
    (lambda t: covrl.ppo_loss(*[x[0] for x in t]), ValueError, "rank 2"),
    (lambda t: covrl.ppo_loss(*t, clip_ratio=1.5), ValueError, "fraction"),
    (lambda t: covrl.ppo_loss(*t, clip_ratio_c=0.5), ValueError, "clip_ratio_c"),
    (lambda t: covrl.kl_cov_loss(*t, kl_cov_ratio=2.0), ValueError, "fraction"),
    (lambda t: covrl.kl_cov_loss(*t, ppo_kl_coef=-1.0), ValueError, "ppo_kl_coef"),
    (lambda t: covrl.clip_cov_loss(*t, clip_cov_lb=5.0, clip_cov_ub=1.0, key=jax.random.key(0)),
     ValueError, "lb < ub"),
    (lambda t: covrl.clip_cov_loss(*t), ValueError, "key"),
    (lambda t: covrl.ppo_loss(*t, loss_agg_mode="mean"), ValueError, "loss_agg_mode"),
    (lambda t: covrl.kl_cov_loss(*t, selection="local", micro_batch_size=4), ValueError,
     "divide"),
    (lambda t: covrl.kl_cov_loss(*t, micro_batch_size=2), ValueError, "local"),
    (lambda t: covrl.entropy_bonus_loss(np.zeros((6, 10, 3)), t[3], coef=-0.1), ValueError,
     "coef"),
    (lambda t: covrl.entropy_bonus_loss(np.zeros((6, 10, 3)), t[3], coef=0.1, temperature=0.0),
     ValueError, "temperature"),
])
def test_bad_input_raises_clearly(call, error, match):
  with pytest.raises(error, match=match):
    call(tokens(13))


# ---------------------------------------------------------------- jit, dtypes
def test_jit_equals_no_jit_and_bfloat16_inputs_compute_in_float32():
  old, new, adv, mask = tokens(14, dtype=np.float32)
  f = functools.partial(covrl.kl_cov_loss, kl_cov_ratio=0.1)
  a, ma = f(old, new, adv, mask)
  b, mb = jax.jit(f)(old, new, adv, mask)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), ma, mb)
  loss16, _ = covrl.ppo_loss(*[jnp.asarray(x, jnp.bfloat16) for x in (old, new, adv)], mask)
  assert loss16.dtype == jnp.float32


CONTROLS = {"none": covrl.NoControl(), "clip_higher": covrl.ClipHigher(),
            "clip_cov": covrl.ClipCov(clip_cov_ratio=0.1, clip_cov_lb=0.0),
            "kl_cov": covrl.KLCov(kl_cov_ratio=0.1), "bonus": covrl.EntropyBonus(0.01)}


class PolicyLossUnderJit(chex.TestCase):
  """Each method's loss, metrics and gradient agree with and without jit (float32 round-off)."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*((name, name) for name in CONTROLS))
  def test_loss_metrics_and_gradient(self, name):
    old, new, adv, mask = tokens(16, dtype=np.float32)
    logits = jax.random.normal(jax.random.key(1), (*old.shape, 6))
    control, key = CONTROLS[name], jax.random.key(2)

    def value_and_grad(lp):
      return jax.value_and_grad(lambda lp: covrl.policy_loss(
          control, old, lp, adv, mask, key=key, logits=logits), has_aux=True)(lp)

    got = self.variant(value_and_grad)(jnp.asarray(new))
    want = jax.jit(value_and_grad)(jnp.asarray(new))
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- local (verl) selection
@pytest.mark.float64
def test_local_selection_selects_per_micro_batch_like_verl():
  """verl ranks tokens within each micro-batch: the counts and means are per micro-batch."""
  old, new, adv, mask = tokens(15, b=8, t=6, p_mask=0.0)
  _, m_local = covrl.kl_cov_loss(old, new, adv, mask, kl_cov_ratio=0.1, selection="local",
                                 micro_batch_size=2)
  ref = np.zeros_like(new)
  for g in range(4):
    rows = slice(2 * g, 2 * g + 2)
    mat, _ = np_kl_cov(old[rows], new[rows], adv[rows], mask[rows], 0.1, 0.1)
    ref[rows] = mat
  loss_local, _ = covrl.kl_cov_loss(old, new, adv, mask, kl_cov_ratio=0.1, selection="local",
                                    micro_batch_size=2)
  np.testing.assert_allclose(loss_local, np_agg(ref, mask, "token-mean"), rtol=1e-12)
  # 4 groups of 12 tokens: each keeps max(floor(1.2), 1) = 1, where global keeps floor(4.8) = 4.
  np.testing.assert_allclose(m_local["selected_frac"] * mask.sum(), 4)
  _, m_global = covrl.kl_cov_loss(old, new, adv, mask, kl_cov_ratio=0.1)
  np.testing.assert_allclose(m_global["selected_frac"] * mask.sum(), 4)
  _, m_small = covrl.kl_cov_loss(old, new, adv, mask, kl_cov_ratio=0.05, selection="local",
                                 micro_batch_size=2)
  np.testing.assert_allclose(m_small["selected_frac"] * mask.sum(), 4)  # the floor of 1 each


# ---------------------------------------------------------------- devices and accumulation
def _mesh():
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


LOSSES = {
    "ppo": lambda key, *a, **k: covrl.ppo_loss(*a, clip_ratio_high=0.28, **k),
    "kl_cov": lambda key, *a, **k: covrl.kl_cov_loss(*a, kl_cov_ratio=0.05, ppo_kl_coef=1.0, **k),
    "clip_cov": lambda key, *a, **k: covrl.clip_cov_loss(*a, key=key, clip_cov_ratio=0.05,
                                                         clip_cov_lb=0.05, clip_cov_ub=3.0, **k),
}


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_one_device_equals_eight_devices(name, mode):
  old, new, adv, mask = tokens(16, b=16, t=12, dtype=np.float32)
  key, loss_fn = jax.random.key(3), LOSSES[name]

  def value_and_grad(**kw):
    return jax.value_and_grad(lambda lp: loss_fn(key, old, lp, adv, mask, loss_agg_mode=mode,
                                                 **kw), has_aux=True)

  (loss1, m1), g1 = jax.jit(value_and_grad())(new)
  mesh = _mesh()
  sharding = NamedSharding(mesh, P("data"))
  (loss8, _), g8 = jax.jit(value_and_grad())(jax.device_put(new, sharding))
  np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
  np.testing.assert_allclose(g8, g1, rtol=1e-5, atol=1e-7)

  def local(o, lp, a, m):
    f = lambda x: loss_fn(key, o, x, a, m, loss_agg_mode=mode, axis_name="data")
    (value, metrics), grad = jax.value_and_grad(f, has_aux=True)(lp)
    return jax.lax.psum(value, "data"), metrics, grad

  sm = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"),) * 4,
                             out_specs=(P(), P(), P("data"))))
  loss_sm, m_sm, g_sm = sm(old, new, adv, mask)
  np.testing.assert_allclose(loss_sm, loss1, rtol=1e-6)
  np.testing.assert_allclose(g_sm, g1, rtol=1e-5, atol=1e-7)
  for k in ("selected_frac", "cov_mean", "cov_max", "clip_frac", "approx_kl"):
    np.testing.assert_allclose(m_sm[k], m1[k], rtol=1e-5, atol=1e-7)
  if name != "ppo":
    assert float(m1["selected_frac"]) > 0


@pytest.mark.parametrize("name", ["kl_cov", "clip_cov"])
def test_gradient_accumulation_with_global_selection_is_exact(name):
  """Select once on the whole batch, pass the rows and the global denominator per micro-batch."""
  old, new, adv, mask = tokens(17, b=8, t=12)
  key = jax.random.key(5)
  cov = covrl.token_covariance(new, adv, mask)
  if name == "kl_cov":
    selected = covrl.kl_cov_select(cov, mask, ratio=0.05).mask
    full = lambda lp: covrl.kl_cov_loss(old, lp, adv, mask, kl_cov_ratio=0.05)[0]
    part = lambda lp, rows, den: covrl.kl_cov_loss(
        old[rows], lp, adv[rows], mask[rows], selected=selected[rows], denominator=den)[0]
  else:
    eligible = ~np_ppo(old, new, adv, .2, .2)[1]
    selected = covrl.clip_cov_select(cov, mask, ratio=0.05, lb=0.05, ub=3.0,
                                     eligible=eligible, key=key).mask
    full = lambda lp: covrl.clip_cov_loss(old, lp, adv, mask, clip_cov_ratio=0.05,
                                          clip_cov_lb=0.05, clip_cov_ub=3.0, key=key)[0]
    part = lambda lp, rows, den: covrl.clip_cov_loss(
        old[rows], lp, adv[rows], mask[rows], selected=selected[rows], denominator=den)[0]
  assert np.asarray(selected).any()
  den = covrl.denominator(mask, "token-mean")
  g_full = jax.grad(full)(new)
  g_acc = np.concatenate([
      jax.grad(part)(new[r], r, den) for r in (slice(0, 2), slice(2, 5), slice(5, 8))
  ])
  np.testing.assert_allclose(g_acc, g_full, atol=1e-12)


def test_metrics_keys_are_the_same_for_every_policy_loss():
  t = tokens(18)
  keys = {
      frozenset(covrl.policy_gradient_loss(*t)[1]),
      frozenset(covrl.ppo_loss(*t)[1]),
      frozenset(covrl.kl_cov_loss(*t)[1]),
      frozenset(covrl.clip_cov_loss(*t, key=jax.random.key(0))[1]),
  }
  assert len(keys) == 1


def test_entropy_metrics_and_predicted_change():
  old, new, adv, mask = tokens(19, b=2, t=3)
  rng = np.random.default_rng(0)
  logits, dz = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
  _, m = covrl.ppo_loss(old, new, adv, mask, logits=logits, logit_update=dz)
  valid = mask > 0
  np.testing.assert_allclose(m["entropy"], np.asarray(covrl.entropy(logits))[valid].mean(),
                             rtol=1e-12)
  np.testing.assert_allclose(
      m["predicted_entropy_change"],
      np.asarray(covrl.entropy_change_first_order(logits, dz))[valid].mean(), rtol=1e-12)


def test_local_clip_cov_uses_per_micro_batch_means_like_verl():
  """Hand-built: the two micro-batches have different means, so the band picks other tokens."""
  new = np.log(np.array([[0.9, 0.5, 0.1, 0.05], [0.9, 0.8, 0.7, 0.6],
                         [0.2, 0.1, 0.05, 0.01], [0.3, 0.2, 0.1, 0.02]]))
  old = new.copy()
  adv = np.array([[2.0, -1.0, 0.5, -2.0], [1.0, 1.0, -1.0, -1.0],
                  [3.0, -3.0, 1.0, 0.0], [2.0, 1.0, -2.0, -1.0]])
  mask = np.ones_like(new)
  kw = dict(clip_cov_ratio=1.0, clip_cov_lb=0.3, clip_cov_ub=5.0)
  _, m_local = covrl.clip_cov_loss(old, new, adv, mask, selection="local",
                                   micro_batch_size=2, **kw, key=jax.random.key(0))
  _, m_global = covrl.clip_cov_loss(old, new, adv, mask, **kw, key=jax.random.key(0))
  per_group = np.concatenate([np_cov(new[r], adv[r], mask[r]) for r in (slice(0, 2),
                                                                         slice(2, 4))])
  whole = np_cov(new, adv, mask)
  band = lambda c: ((c > 0.3) & (c < 5.0)).sum()  # on-policy: nothing is PPO-clipped
  np.testing.assert_allclose(m_local["selected_frac"] * 16, band(per_group))
  np.testing.assert_allclose(m_global["selected_frac"] * 16, band(whole))
  assert band(per_group) != band(whole)


def test_entropy_bonus_gradient_equals_the_custom_jvp_entropy_gradient():
  """The loss uses a reverse-only entropy for speed; its gradient must equal covrl.entropy's."""
  rng = np.random.default_rng(20)
  logits = rng.normal(size=(2, 3, 6)) * 3
  logits[0, 0, 2] = -np.inf
  mask = np.array([[1, 1, 0], [1, 0, 1]], np.float64)
  g_loss = jax.grad(lambda z: covrl.entropy_bonus_loss(z, mask, coef=0.3, temperature=0.8)[0])(
      jnp.asarray(logits))
  g_ref = jax.grad(lambda z: -0.3 * jnp.sum(covrl.entropy(z / 0.8) * mask) / mask.sum())(
      jnp.asarray(logits))
  np.testing.assert_allclose(g_loss, g_ref, atol=1e-14)


def test_entropy_bonus_eager_checks_only_valid_positions():
  logits = np.zeros((1, 2, 3))
  logits[0, 1] = -np.inf  # all -inf, but at a padding position
  loss, _ = covrl.entropy_bonus_loss(logits, np.array([[1.0, 0.0]]), coef=1.0)
  np.testing.assert_allclose(loss, -np.log(3))
  logits[0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    covrl.entropy_bonus_loss(logits, np.array([[1.0, 0.0]]), coef=1.0)


def test_value_checks_run_when_a_jit_closes_over_concrete_arrays():
  """A jitted loss that closes over concrete batch arrays (a common way to write a step) sees
  them as concrete: their value checks run at trace time, and bad values still raise."""
  rng = np.random.default_rng(0)
  old = jnp.asarray(rng.standard_normal((3, 4)) - 2.0, jnp.float32)
  adv = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
  mask = jnp.asarray([[1, 1, 0, 1], [1, 0, 1, 1], [1, 1, 1, 0]], bool)
  logits = jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32)
  weights = jnp.asarray(rng.random((3, 4)), jnp.float32)

  def loss(lp, old=old, mask=mask):
    value, _ = covrl.policy_loss(covrl.EntropyBonus(0.01), old, lp, adv, mask, logits=logits)
    return value + covrl.pooled_entropy(logits, weights)

  lp = old + 0.1
  eager_value = loss(lp)
  np.testing.assert_allclose(jax.jit(loss)(lp), eager_value, rtol=1e-6)
  bad_old, bad_mask = old.at[0, 0].set(jnp.nan), mask.astype(jnp.float32).at[0, 0].set(0.5)
  with pytest.raises(ValueError, match="non-finite"):
    jax.jit(lambda lp: loss(lp, old=bad_old))(lp)
  with pytest.raises(ValueError, match="only 0 and 1"):
    jax.jit(lambda lp: loss(lp, mask=bad_mask))(lp)

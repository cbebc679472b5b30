"""The entropy-control methods of issue 12 against independent NumPy references of the papers'
definitions: forking tokens, entropy advantage shaping, W-REINFORCE, STEER and the adaptive
bonus; jit, float64 finite differences, bad input, 1 = 8 devices, micro-batching, transforms."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _numeric import central_difference
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import covrl
from covrl import controllers, tabular

MODES = ("token-mean", "seq-mean-token-mean")


# ---------------------------------------------------------------- NumPy references (float64)
def np_entropy(logits):
  z = logits - logits.max(-1, keepdims=True)
  p = np.exp(z)
  p /= p.sum(-1, keepdims=True)
  return -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)


def np_ppo(old, new, adv, low=0.2, high=0.2, c=3.0):
  """PPO's token loss with the dual clip, and the slope -d loss / d log pi."""
  r = np.exp(np.clip(new - old, -20, 20))
  l1, l2 = -adv * r, -adv * np.clip(r, 1 - low, 1 + high)
  loss = np.maximum(l1, l2)
  slope = np.where(l2 > l1, 0.0, adv * r)
  if c is not None:
    lower = (adv < 0) & (loss > -adv * c)
    loss = np.where(adv < 0, np.minimum(loss, -adv * c), loss)
    slope = np.where(lower, 0.0, slope)
  return loss, slope


def np_agg(loss, mask, mode):
  m = mask > 0
  if mode == "token-mean":
    return np.where(m, loss, 0).sum() / max(m.sum(), 1)
  rows = [i for i in range(loss.shape[0]) if m[i].any()]
  return float(np.mean([loss[i][m[i]].sum() / m[i].sum() for i in rows]))


def np_top_entropy_mask(h, mask, rho):
  """Kept tokens: entropy >= the linear-interpolation (1 - rho)-quantile of the valid ones."""
  m = mask > 0
  if not m.any():
    return np.zeros_like(m)
  threshold = np.quantile(h[m], 1.0 - rho, method="linear")
  return m & (h >= threshold)


def np_steer_weights(old, new, adv, h, mask, w_min, w_max=1.0, mapping="exp", floor=0.02):
  _, slope = np_ppo(old, new, adv)
  p = np.exp(new)
  omega = np.abs(-slope * p * (1 - p) * (new + h))
  m = mask > 0
  if mapping == "exp":
    scale = max(omega[m].max(), floor)
    w = np.clip(np.exp(np.log(w_min) * omega / scale), w_min, 1.0)
  else:
    lo, hi = omega[m].min(), omega[m].max()
    w = np.clip(w_max - (omega - lo) * (w_max - w_min) / (hi - lo), w_min, w_max)
  return np.where(m, w, 1.0)


def tokens(seed, b=6, t=10, v=7, p_mask=0.25, dtype=np.float64):
  """[B, T] log-probabilities of sampled tokens of random logits, and the logits."""
  rng = np.random.default_rng(seed)
  logits = 2.0 * rng.normal(size=(b, t, v))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  actions = rng.integers(0, v, size=(b, t))
  new = np.take_along_axis(logp, actions[..., None], -1)[..., 0]
  old = new + 0.2 * rng.normal(size=(b, t))
  adv = rng.normal(size=(b, t))
  mask = (rng.random((b, t)) > p_mask).astype(np.float64)
  mask[0] = 0.0  # an empty sequence
  return [x.astype(dtype) for x in (old, new, adv, mask, logits)]


# ---------------------------------------------------------------- values
@pytest.mark.float64
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rho", [0.2, 0.5, 1.0, 0.0])
def test_forking_tokens_match_reference(mode, rho):
  old, new, adv, mask, logits = tokens(0)
  h = np_entropy(logits)
  loss, m = covrl.policy_loss(covrl.ForkingTokens(top_entropy_quantile=rho), old, new, adv, mask,
                              logits=logits, loss_agg_mode=mode)
  keep = np_top_entropy_mask(h, mask, rho)
  ref, _ = np_ppo(old, new, adv)
  np.testing.assert_allclose(loss, np_agg(np.where(keep, ref, 0.0), mask, mode), rtol=1e-12)
  np.testing.assert_allclose(m["selected_frac"], keep.sum() / mask.sum(), rtol=1e-12)
  np.testing.assert_allclose(m["touched_frac"], 1 - keep.sum() / mask.sum(), rtol=1e-12)
  # The same from entropies computed elsewhere (entropy= instead of logits=).
  loss_h, _ = covrl.policy_loss(covrl.ForkingTokens(top_entropy_quantile=rho), old, new, adv,
                                mask, entropy=h, loss_agg_mode=mode)
  np.testing.assert_allclose(loss_h, loss, rtol=1e-12)


def test_high_entropy_select_keeps_ties_and_the_top_fraction():
  h = np.array([[0.5, 0.5, 0.5, 2.0], [1.0, 0.0, 3.0, 0.5]])
  mask = np.array([[1, 1, 1, 1], [1, 0, 1, 1]], np.float64)
  for rho in (0.0, 0.3, 0.5, 0.9, 1.0):
    got = covrl.high_entropy_select(h, mask, top_entropy_quantile=rho)
    want = np_top_entropy_mask(h, mask, rho)
    np.testing.assert_array_equal(got.mask, want)
    assert int(got.count) == want.sum()
  none = covrl.high_entropy_select(h, np.zeros_like(mask), top_entropy_quantile=0.2)
  assert not np.asarray(none.mask).any() and int(none.count) == 0


@pytest.mark.float64
@pytest.mark.parametrize("mode", MODES)
def test_entropy_advantage_matches_reference(mode):
  old, new, adv, mask, logits = tokens(1)
  alpha, kappa = 0.4, 2.0
  h = np_entropy(logits)
  shaped = adv + np.minimum(alpha * h, np.abs(adv) / kappa)
  assert np.all(np.sign(shaped) == np.sign(adv))  # the clip keeps every sign
  loss, m = covrl.policy_loss(covrl.EntropyAdvantage(alpha=alpha, kappa=kappa), old, new, adv,
                              mask, logits=logits, loss_agg_mode=mode)
  np.testing.assert_allclose(loss, np_agg(np_ppo(old, new, shaped)[0], mask, mode), rtol=1e-12)
  np.testing.assert_allclose(m["touched_frac"], 1.0)  # every A != 0, H > 0 token


@pytest.mark.float64
@pytest.mark.parametrize("lam", [0.1, 0.5, 1.0, 2.0])
def test_w_reinforce_matches_reference(lam):
  old, new, adv, mask, _ = tokens(2)
  # The paper's advantages: the rewards +1 (correct) / -1 (incorrect).
  adv = np.where(adv > 0, 1.0, -1.0)
  weighted = np.where(adv > 0, lam, -1.0)
  loss, m = covrl.policy_loss(covrl.WReinforce(positive_advantage_weight=lam), old, new, adv,
                              mask)
  np.testing.assert_allclose(loss, np_agg(np_ppo(old, new, weighted)[0], mask, "token-mean"),
                             rtol=1e-12)
  positive = ((adv > 0) & (mask > 0)).sum() / mask.sum()
  np.testing.assert_allclose(m["touched_frac"], positive if lam != 1.0 else 0.0)


@pytest.mark.parametrize("mapping, w_min, w_max", [("exp", 0.8, 1.0), ("exp", 0.3, 1.0),
                                                   ("linear", 0.8, 1.2)])
@pytest.mark.float64
def test_steer_matches_reference(mapping, w_min, w_max):
  old, new, adv, mask, logits = tokens(3)
  h = np_entropy(logits)
  control = covrl.STEER(token_weight_min=w_min, token_weight_max=w_max, mapping=mapping)
  loss, _ = covrl.policy_loss(control, old, new, adv, mask, logits=logits)
  w = np_steer_weights(old, new, adv, h, mask, w_min, w_max, mapping)
  np.testing.assert_allclose(loss, np_agg(w * np_ppo(old, new, adv)[0], mask, "token-mean"),
                             rtol=1e-12)
  tk = covrl.policy_tokens(old, new, adv, mask)._replace(entropy=jnp.asarray(h * mask))
  np.testing.assert_allclose(control.weights(tk, control.surrogate(tk)), w, rtol=1e-12)


@pytest.mark.float64
def test_steer_omega_is_the_first_order_entropy_change_of_the_sampled_logit():
  """Omega = -Cov_pi(log pi, dz) for dz = c (1 - pi_y) e_y, with covrl's own predictor."""
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(1, 5, 6))
  y = rng.integers(0, 6, size=(1, 5))
  logp = np.asarray(jax.nn.log_softmax(logits))
  lp = np.take_along_axis(logp, y[..., None], -1)[..., 0]
  adv = rng.normal(size=(1, 5))
  tk = covrl.policy_tokens(lp, lp, adv, np.ones((1, 5)))._replace(
      entropy=jnp.asarray(np_entropy(logits)))
  control = covrl.STEER()
  omega = control.predicted_change(tk, control.surrogate(tk))
  dz = (adv * (1 - np.exp(lp)))[..., None] * np.eye(6)[y]  # on-policy: slope c = A
  np.testing.assert_allclose(omega, covrl.entropy_change_first_order(logits, dz), rtol=1e-10)


@pytest.mark.float64
def test_score_covariance_identity_of_proofs_t5():
  """(3) of proofs/T5_methods.md: Cov_pi(log pi, e_y - pi) = pi_y (log pi_y + H) - sum_a
  pi_a^2 (log pi_a + H), against covrl's own first-order predictor (-Cov(log pi, dz))."""
  rng = np.random.default_rng(14)
  z = rng.normal(size=(6, 5)) * 2
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  h = np_entropy(z)
  for y in range(5):
    dz = np.eye(5)[y] - p
    s = p[:, y] * (np.log(p[:, y]) + h) - (p**2 * (np.log(p) + h[:, None])).sum(-1)
    np.testing.assert_allclose(-np.asarray(covrl.entropy_change_first_order(z, dz)), s,
                               rtol=1e-10, atol=1e-14)


def test_adaptive_bonus_is_the_bonus_and_its_controller_is_skyworks_rule():
  old, new, adv, mask, logits = tokens(5)
  adaptive = covrl.AdaptiveEntropyBonus(entropy_coeff=2e-3)
  assert isinstance(adaptive, covrl.EntropyBonus)
  a, _ = covrl.policy_loss(adaptive, old, new, adv, mask, logits=logits)
  b, _ = covrl.policy_loss(covrl.EntropyBonus(2e-3), old, new, adv, mask, logits=logits)
  np.testing.assert_allclose(a, b, rtol=1e-14)
  ctl = adaptive.controller(vocab_size=7)
  state, level, lo, hi, delta, target = ctl.init(), 2e-3, 0.0, 5e-3, 1e-4, 0.2
  for h in [0.5, 0.1, 0.15, 0.3, 0.05, 0.05, 0.25]:
    coef, state = ctl.update(state, jnp.asarray(h))
    below = h < target
    level = float(np.clip(level + (delta if below else -delta), lo, hi))
    np.testing.assert_allclose(coef, level if below else 0.0, rtol=1e-6, atol=1e-12)
  trl = covrl.AdaptiveEntropyBonus.trl()
  assert (trl.entropy_coef_delta, trl.entropy_coef_max, trl.delay) == (5e-3, 1.0, 1)


# ---------------------------------------------------------------- jit and gradients
CONTROLS = {
    "forking": covrl.ForkingTokens(top_entropy_quantile=0.3),
    "entropy_advantage": covrl.EntropyAdvantage(),
    "w_reinforce": covrl.WReinforce(),
    "steer": covrl.STEER(token_weight_min=0.5),
    "adaptive": covrl.AdaptiveEntropyBonus(entropy_coeff=1e-3),
}


@pytest.mark.parametrize("name", list(CONTROLS))
def test_jit_equals_no_jit_and_bfloat16_inputs_compute_in_float32(name):
  old, new, adv, mask, logits = tokens(6, dtype=np.float32)
  f = functools.partial(covrl.policy_loss, CONTROLS[name], logits=logits)
  a, ma = f(old, new, adv, mask)
  b, mb = jax.jit(f)(old, new, adv, mask)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), ma, mb)
  loss16, _ = covrl.policy_loss(CONTROLS[name], *[jnp.asarray(x, jnp.bfloat16)
                                                  for x in (old, new, adv)], mask,
                                logits=jnp.asarray(logits, jnp.bfloat16))
  assert loss16.dtype == jnp.float32


fd = central_difference


@pytest.mark.parametrize("name", ["forking", "entropy_advantage", "w_reinforce", "steer"])
def test_gradients_match_finite_differences_of_the_reference(name):
  """The weights and selections are detached: the gradient is that of the reference loss with
  them held at their values (finite differences of the NumPy loss, weights frozen)."""
  old, new, adv, mask, logits = tokens(7, b=3, t=5)
  h = np_entropy(logits)
  control = CONTROLS[name]
  if name == "forking":
    frozen = np_top_entropy_mask(h, mask, 0.3).astype(float)
    ref = lambda lp: np_agg(frozen * np_ppo(old, lp, adv)[0], mask, "token-mean")
  elif name == "entropy_advantage":
    shaped = adv + np.minimum(0.4 * h, np.abs(adv) / 2.0)
    ref = lambda lp: np_agg(np_ppo(old, lp, shaped)[0], mask, "token-mean")
  elif name == "w_reinforce":
    ref = lambda lp: np_agg(np.where(adv > 0, 0.1, 1.0) * np_ppo(old, lp, adv)[0], mask,
                            "token-mean")
  else:
    frozen = np_steer_weights(old, new, adv, h, mask, 0.5)
    ref = lambda lp: np_agg(frozen * np_ppo(old, lp, adv)[0], mask, "token-mean")
  g = jax.grad(lambda lp: covrl.policy_loss(control, old, lp, adv, mask, entropy=h)[0])(
      jnp.asarray(new))
  np.testing.assert_allclose(g, fd(ref, new), atol=1e-7)
  assert np.all(np.asarray(g)[mask == 0] == 0)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("build, error, match", [
    (lambda: covrl.ForkingTokens(top_entropy_quantile=1.5), ValueError, "top_entropy_quantile"),
    (lambda: covrl.ForkingTokens(micro_batch_size=2), ValueError, "local"),
    (lambda: covrl.ForkingTokens(selection="batch"), ValueError, "selection"),
    (lambda: covrl.EntropyAdvantage(kappa=1.0), ValueError, "kappa"),
    (lambda: covrl.EntropyAdvantage(alpha=-0.1), ValueError, "alpha"),
    (lambda: covrl.WReinforce(positive_advantage_weight=-1.0), ValueError,
     "positive_advantage_weight"),
    (lambda: covrl.STEER(token_weight_min=0.0), ValueError, "token_weight_min"),
    (lambda: covrl.STEER(token_weight_min=0.9, token_weight_max=0.8), ValueError,
     "token_weight_max"),
    (lambda: covrl.STEER(mapping="cubic"), ValueError, "mapping"),
    (lambda: covrl.STEER(omega_floor=0.0), ValueError, "omega_floor"),
    (lambda: covrl.AdaptiveEntropyBonus(entropy_coef_min=0.1, entropy_coef_max=0.01),
     ValueError, "entropy_coef_min"),
    (lambda: covrl.AdaptiveEntropyBonus(entropy_coeff=0.5), ValueError, "entropy_coeff"),
    (lambda: covrl.AdaptiveEntropyBonus(entropy_coef_delta=0.0), ValueError,
     "entropy_coef_delta"),
])
def test_bad_values_raise_naming_the_field(build, error, match):
  with pytest.raises(error, match=match):
    build()


@pytest.mark.parametrize("call, error, match", [
    (lambda t: covrl.policy_loss(covrl.ForkingTokens(), *t[:4]), ValueError, "entropy"),
    (lambda t: covrl.policy_loss(covrl.STEER(), *t[:4], entropy=t[4][..., 0, :]), ValueError,
     "shape mismatch"),
    (lambda t: covrl.policy_loss(covrl.EntropyAdvantage(), *t[:4],
                                 entropy=np.zeros(t[0].shape, np.int32)), TypeError, "floating"),
    (lambda t: covrl.high_entropy_select(t[0], t[3], top_entropy_quantile=-0.5), ValueError,
     "top_entropy_quantile"),
    (lambda t: covrl.high_entropy_select(t[0][0], t[3][0], top_entropy_quantile=0.2), ValueError,
     "rank 2"),
    (lambda t: covrl.policy_loss(covrl.ForkingTokens(top_entropy_quantile=covrl.schedules
                                                     .inverse_time(0.5)), *t[:4], logits=t[4]),
     ValueError, "step"),
])
def test_bad_calls_raise_clearly(call, error, match):
  with pytest.raises(error, match=match):
    call(tokens(8))


def test_metrics_keys_are_the_same_for_every_method():
  old, new, adv, mask, logits = tokens(9)
  keys = {frozenset(covrl.policy_loss(c, old, new, adv, mask, logits=logits)[1])
          for c in [covrl.NoControl(), covrl.KLCov(), *CONTROLS.values()]}
  assert len(keys) == 1


# ---------------------------------------------------------------- devices and micro-batches
def _mesh():
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("name", ["forking", "steer", "entropy_advantage"])
def test_one_device_equals_eight_devices(name):
  old, new, adv, mask, logits = tokens(10, b=16, t=12, dtype=np.float32)
  h = np_entropy(logits).astype(np.float32)
  control = CONTROLS[name]

  def value_and_grad(**kw):
    return jax.value_and_grad(lambda lp: covrl.policy_loss(control, old, lp, adv, mask,
                                                           entropy=h, **kw), has_aux=True)

  (loss1, m1), g1 = jax.jit(value_and_grad())(new)
  mesh = _mesh()
  (loss8, _), g8 = jax.jit(value_and_grad())(jax.device_put(new, NamedSharding(mesh, P("data"))))
  np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
  np.testing.assert_allclose(g8, g1, rtol=1e-5, atol=1e-7)

  def local(o, lp, a, m, e):
    f = lambda x: covrl.policy_loss(control, o, x, a, m, entropy=e, axis_name="data")
    (value, metrics), grad = jax.value_and_grad(f, has_aux=True)(lp)
    return jax.lax.psum(value, "data"), metrics, grad

  sm = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"),) * 5,
                             out_specs=(P(), P(), P("data"))))
  loss_sm, m_sm, g_sm = sm(old, new, adv, mask, h)
  np.testing.assert_allclose(loss_sm, loss1, rtol=1e-6)
  np.testing.assert_allclose(g_sm, g1, rtol=1e-5, atol=1e-7)
  for k in ("selected_frac", "touched_frac", "clip_frac"):
    np.testing.assert_allclose(m_sm[k], m1[k], rtol=1e-5, atol=1e-7)
  if name == "forking":  # the kept set is the global one, not eight local quantiles
    np.testing.assert_allclose(m1["selected_frac"] * mask.sum(),
                               np_top_entropy_mask(h, mask, 0.3).sum())


def test_gradient_accumulation_with_the_global_quantile_is_exact():
  """Select once on the whole batch, pass each micro-batch its rows and the global denominator."""
  old, new, adv, mask, logits = tokens(11, b=8, t=12)
  h = np_entropy(logits)
  control = CONTROLS["forking"]
  selected = covrl.high_entropy_select(h, mask, top_entropy_quantile=0.3).mask
  full = lambda lp: covrl.policy_loss(control, old, lp, adv, mask, entropy=h)[0]
  part = lambda lp, rows, den: covrl.policy_loss(
      control, old[rows], lp, adv[rows], mask[rows], entropy=h[rows], selected=selected[rows],
      denominator=den)[0]
  den = covrl.denominator(mask, "token-mean")
  g_acc = np.concatenate([jax.grad(part)(new[r], r, den)
                          for r in (slice(0, 2), slice(2, 5), slice(5, 8))])
  np.testing.assert_allclose(g_acc, jax.grad(full)(new), atol=1e-12)


@pytest.mark.float64
def test_local_mode_takes_the_quantile_per_micro_batch():
  old, new, adv, mask, logits = tokens(12, b=8, t=6, p_mask=0.0)
  h = np_entropy(logits)
  control = covrl.ForkingTokens(top_entropy_quantile=0.3, selection="local", micro_batch_size=2)
  loss, m = covrl.policy_loss(control, old, new, adv, mask, entropy=h)
  keep = np.concatenate([np_top_entropy_mask(h[r], mask[r], 0.3)
                         for r in (slice(2 * g, 2 * g + 2) for g in range(4))])
  np.testing.assert_allclose(loss, np_agg(np.where(keep, np_ppo(old, new, adv)[0], 0.0), mask,
                                          "token-mean"), rtol=1e-12)
  np.testing.assert_allclose(m["selected_frac"] * mask.sum(), keep.sum())
  assert keep.sum() != np_top_entropy_mask(h, mask, 0.3).sum() or not np.array_equal(
      keep, np_top_entropy_mask(h, mask, 0.3))


# ---------------------------------------------------------------- transforms and the lab
@pytest.mark.float64
@pytest.mark.parametrize("name", ["forking", "entropy_advantage", "w_reinforce", "steer"])
def test_transform_adds_the_gradient_of_the_methods_change(name):
  """transform(control) + the PPO gradient = the gradient of the method's own loss on samples."""
  rng = np.random.default_rng(13)
  s, k, n = 4, 5, 48
  z = jnp.asarray(rng.normal(size=(s, k)))
  old_z = z + 0.1 * jnp.asarray(rng.normal(size=(s, k)))
  states = jnp.asarray(rng.integers(0, s, size=n))
  actions = jnp.asarray(rng.integers(0, k, size=n))
  adv = jnp.asarray(rng.normal(size=n))
  control = CONTROLS[name]
  gather = lambda x: jax.nn.log_softmax(x)[states, actions][None]
  old_lp = jax.lax.stop_gradient(gather(old_z))
  ones = jnp.ones((1, n))
  ppo = jax.grad(lambda x: covrl.ppo_loss(old_lp, gather(x), adv[None], ones)[0])(z)
  own = jax.grad(lambda x: covrl.policy_loss(control, old_lp, gather(x), adv[None], ones,
                                             logits=jax.lax.stop_gradient(x[states][None]))[0])(z)
  tx = covrl.transform(control)
  updates, _ = tx.update(ppo, tx.init(z), z, actions=actions, advantages=adv, states=states,
                         old_logits=old_z)
  np.testing.assert_allclose(updates, own, rtol=1e-10, atol=1e-12)
  assert np.abs(np.asarray(updates - ppo)).max() > 1e-6


@pytest.mark.parametrize("control", [covrl.ForkingTokens(), covrl.EntropyAdvantage(),
                                     covrl.WReinforce(), covrl.STEER()], ids=lambda c: c.name)
def test_each_method_runs_in_the_sampled_tabular_lab(control):
  config = tabular.TabularConfig(tabular.Bandit((0.8, 0.6, 0.5, 0.2), noise="bernoulli"),
                                 dynamics="sampled", control=control, step_size=0.5,
                                 advantage="grpo", num_steps=40, record_every=10,
                                 ppo_epochs=2, num_minibatches=2)
  result = jax.jit(tabular.make_train(config))(jax.random.key(0))
  assert np.all(np.isfinite(np.asarray(result.gap)))
  assert float(result.gap[-1]) < float(result.gap[0])


def test_a_scheduled_strength_is_evaluated_at_each_step_in_the_lab():
  rho = lambda t: 1.0 - 0.8 / (1.0 + t / 10.0)  # rho_t -> 1: forking tokens switched off
  config = tabular.TabularConfig(tabular.Bandit((0.8, 0.6, 0.5, 0.2), noise="bernoulli"),
                                 dynamics="sampled", control=covrl.ForkingTokens(rho),
                                 num_steps=4)
  hyper = config.hyperparams()
  for t in (0, 30):
    c = tabular.dynamics.control_at(config, jnp.asarray(t), hyper)
    np.testing.assert_allclose(c.top_entropy_quantile, rho(t), rtol=1e-6)


def test_adaptive_bonus_runs_closed_loop_in_the_tabular_lab():
  bonus = covrl.AdaptiveEntropyBonus(entropy_coeff=0.05, entropy_target=0.6,
                                     entropy_coef_delta=0.05, entropy_coef_max=1.0)
  config = tabular.TabularConfig(tabular.Bandit((0.8, 0.6, 0.5, 0.2), noise="bernoulli"),
                                 dynamics="sampled", control=bonus, step_size=0.5,
                                 advantage="grpo", num_steps=60)
  ctl = bonus.controller(vocab_size=4, num_steps=60)
  assert isinstance(ctl, controllers.Controller) and ctl.name == "reactive"
  out = jax.jit(tabular.make_controlled_train(config, ctl, bonus.entropy_target))(
      jax.random.key(1))
  coef, h = np.asarray(out.coef), np.asarray(out.entropy[:-1])
  assert np.all((coef == 0) | (h < 0.6))  # the bonus acts only below the target
  assert coef.max() > 0


def test_optax_chain_with_forking_tokens_trains_a_bandit():
  r = jnp.array([1.0, 0.5, 0.0, 0.2])
  opt = optax.chain(covrl.transform(covrl.ForkingTokens(0.5)), optax.sgd(0.5))
  z = jnp.zeros(4)
  state = opt.init(z)
  key = jax.random.key(0)

  def ppo_grad(z, actions, adv):
    lp = lambda x: jax.nn.log_softmax(x)[actions][None]
    return jax.grad(lambda x: covrl.ppo_loss(jax.lax.stop_gradient(lp(x)), lp(x), adv[None],
                                             jnp.ones((1, 32)))[0])(z)

  @jax.jit
  def step(z, state, key):
    key, sub = jax.random.split(key)
    actions = jax.random.categorical(sub, z, shape=(32,))
    adv = r[actions] - jax.nn.softmax(z) @ r
    g = ppo_grad(z, actions, adv)
    updates, state = opt.update(g, state, z, actions=actions, advantages=adv)
    return optax.apply_updates(z, updates), state, key

  for _ in range(200):
    z, state, key = step(z, state, key)
  assert float(jax.nn.softmax(z)[0]) > 0.9

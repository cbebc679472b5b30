"""Entropy controllers (covrl.controllers) and the controlled tabular loop (covrl.tabular)."

Expected values come from closed forms (the first-order entropy change of a bonus step is
eta alpha |grad H|^2, THEORY.md T1.6) and from NumPy re-implementations of the reactive and PID
rules written here from their definitions, not from covrl's output.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import covrl
from covrl import controllers, tabular
from covrl import entropy_prediction as ep
from covrl._compat import enable_x64
from covrl.tabular import bandits

# ------------------------------------------------------------------------------- NumPy helpers


def np_entropy(z):
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return -(p * np.log(p)).sum(-1), p


def np_first_order(z, dz):
  """-Cov_pi(log pi, dz), in NumPy."""
  _, p = np_entropy(z)
  logp = np.log(p)
  return -(p * (logp - (p * logp).sum(-1, keepdims=True)) * dz).sum(-1)


def np_grad_entropy(z):
  h, p = np_entropy(z)
  return -p * (np.log(p) + h[..., None])


# ------------------------------------------------------------------------------------- targets


def test_target_paths_closed_form():
  t = np.arange(0, 25)
  np.testing.assert_allclose(controllers.constant_target(0.7)(t), np.full(25, 0.7))
  lin = controllers.linear_target(2.0, 0.5, 10)
  np.testing.assert_allclose(lin(t), np.where(t < 10, 2.0 - 0.15 * t, 0.5), rtol=1e-6)
  exp = controllers.exponential_target(2.0, 0.5, 4.0)
  np.testing.assert_allclose(exp(t), 0.5 + 1.5 * 0.5 ** (t / 4.0), rtol=1e-6)
  # Any callable is a target; its range is checked on t = 0..num_steps.
  assert controllers.target_bounds(lambda s: 1.0 / (1.0 + s), 20) == pytest.approx((1 / 21, 1.0))


@pytest.mark.parametrize("make", [
    lambda: controllers.constant_target(-0.1),
    lambda: controllers.linear_target(math.log(4) + 0.01, 0.5, 10),
    lambda: controllers.exponential_target(1.0, -0.2, 3.0),
    lambda: lambda s: 2.0 - 0.1 * s,  # a plain callable: reaches -1 at s = 30
])
def test_target_outside_zero_log_v_is_rejected_when_built(make):
  with pytest.raises(ValueError, match=r"leaves \[0, log V\]"):
    controllers.predictive(make(), vocab_size=4, coef_range=(0.0, 1.0), num_steps=30)
  with pytest.raises(ValueError, match=r"leaves \[0, log V\]"):
    controllers.reactive(make(), vocab_size=4, delta=0.1, coef_range=(0.0, 1.0), num_steps=30)


def test_target_at_log_v_is_allowed_and_bad_targets_fail_clearly():
  controllers.predictive(math.log(4), vocab_size=4, coef_range=(0.0, 1.0))
  with pytest.raises(ValueError, match="num_steps"):
    controllers.predictive(lambda s: 0.5 + 0 * s, vocab_size=4, coef_range=(0.0, 1.0))
  with pytest.raises(ValueError, match="not finite"):
    controllers.target_bounds(lambda s: jnp.log(s - 1.0), 5)
  with pytest.raises(ValueError, match="vocab_size"):
    controllers.predictive(0.5, vocab_size=1, coef_range=(0.0, 1.0))
  with pytest.raises(TypeError):
    controllers.predictive("high", vocab_size=4, coef_range=(0.0, 1.0))


# --------------------------------------------------------------------------- gains and ranges


@pytest.mark.parametrize("gain", [0.0, 2.0, -0.5, 2.5, float("nan")])
def test_unstable_gain_is_rejected(gain):
  with pytest.raises(ValueError, match="gain"):
    controllers.predictive(0.5, vocab_size=4, coef_range=(0.0, 1.0), gain=gain)


def test_bad_hyperparameters_are_rejected():
  kw = dict(vocab_size=4, coef_range=(0.0, 1.0))
  with pytest.raises(ValueError, match="delta"):
    controllers.reactive(0.5, delta=0.0, **kw)
  with pytest.raises(ValueError, match="delay"):
    controllers.reactive(0.5, delta=0.1, delay=2, **kw)
  with pytest.raises(ValueError, match="kp"):
    controllers.pid(0.5, kp=-1.0, **kw)
  with pytest.raises(ValueError, match="positive gain"):
    controllers.pid(0.5, kp=0.0, **kw)
  with pytest.raises(ValueError, match="coef_range"):
    controllers.predictive(0.5, vocab_size=4, coef_range=(1.0, 1.0))
  with pytest.raises(ValueError, match="coef_range"):
    controllers.predictive(0.5, vocab_size=4, coef_range=(0.0, float("inf")))
  with pytest.raises(ValueError, match="init_coef"):
    controllers.predictive(0.5, init_coef=2.0, **kw)
  with pytest.raises(ValueError, match="solver"):
    controllers.predictive(0.5, solver="golden", **kw)
  with pytest.raises(ValueError, match="coef"):
    controllers.fixed(float("nan"))


def test_pid_poles_and_stability_check():
  # P control of an integrating plant: one pole at 1 - b kp.
  np.testing.assert_allclose(controllers.pid_poles(0.5, 0.0, 0.0, 2.0), [0.0], atol=1e-12)
  np.testing.assert_allclose(controllers.pid_poles(0.3, 0.0, 0.0, 2.0), [0.4], atol=1e-12)
  # PI: z^2 - (2 - b (kp + ki)) z + (1 - b kp) = 0, the roots of e_{t+1} = e_t - b c_t.
  kp, ki, b = 0.4, 0.1, 1.5
  expected = np.roots([1.0, -(2 - b * (kp + ki)), 1 - b * kp])
  np.testing.assert_allclose(np.sort_complex(controllers.pid_poles(kp, ki, 0.0, b)),
                             np.sort_complex(expected), atol=1e-12)
  kw = dict(vocab_size=4, coef_range=(0.0, 10.0))
  controllers.pid(0.5, kp=0.5, plant_gain=2.0, **kw)  # pole 0: fine
  with pytest.raises(ValueError, match="unstable"):
    controllers.pid(0.5, kp=1.2, plant_gain=2.0, **kw)  # pole -1.4
  with pytest.raises(ValueError, match="plant_gain"):
    controllers.pid(0.5, kp=1.0, plant_gain=-1.0, **kw)


# ---------------------------------------------------------------------- the predictive rule


def _bonus_problem(dtype=np.float64):
  z = np.array([[2.0, 0.5, -1.0, 0.0], [0.3, -0.2, 0.1, 1.5]], dtype)
  dz_pg = np.array([[0.2, -0.05, -0.1, -0.05], [-0.1, 0.2, 0.0, -0.1]], dtype)
  rho = np.array([0.25, 0.75], dtype)
  return z, dz_pg, rho


@pytest.mark.parametrize("solver", ["secant", "newton", "bisection", "grid"])
@pytest.mark.parametrize("gain", [1.0, 0.5])
def test_predictive_hits_the_predicted_target_exactly_for_an_affine_update(solver, gain):
  """SGD with a bonus: dz(c) = dz_pg + c grad H, so f(c) = f0 + c |grad H|^2_rho is affine."""
  with enable_x64(True):
    z, dz_pg, rho = _bonus_problem()
    h_now = float(rho @ np_entropy(z)[0])
    target = controllers.linear_target(h_now - 0.02, h_now + 0.18, 4)
    ctl = controllers.predictive(target, vocab_size=4, coef_range=(0.0, 50.0), gain=gain,
                                 solver=solver, num_iters=40)
    g = np_grad_entropy(z)

    def predict(c):
      return ep.pooled_entropy_change(jnp.asarray(z), jnp.asarray(dz_pg) + c * g, rho)

    coef, state = ctl.update(ctl.init(), jnp.asarray(h_now), predict)
    # Closed form: f0 = sum_s rho_s (-Cov(log pi_s, dz_pg_s)), slope = sum_s rho_s |grad H_s|^2.
    f0 = rho @ np_first_order(z, dz_pg)
    slope = rho @ (g**2).sum(-1)
    desired = (target(1) - target(0)) + gain * (target(0) - h_now)
    expected = (float(desired) - f0) / slope
    assert 0 < expected < 50
    np.testing.assert_allclose(float(coef), expected, rtol=1e-9)
    np.testing.assert_allclose(float(state.predicted), float(desired), atol=1e-12)
    assert not bool(state.saturated) and not bool(state.nonfinite)
    assert int(state.count) == 1


@pytest.mark.parametrize("solver,kw", [("bisection", {"num_iters": 60}),
                                       ("grid", {"num_points": 7})])
def test_predictive_second_order_solves_the_quadratic(solver, kw):
  with enable_x64(True):
    z, dz_pg, rho = _bonus_problem()
    g = np_grad_entropy(z)
    h_now = float(rho @ np_entropy(z)[0])

    def predict(c):
      return ep.pooled_entropy_change(jnp.asarray(z), jnp.asarray(dz_pg) + c * g, rho,
                                               order=2)

    # On [0, 3] the quadratic prediction rises monotonically (from +0.009 to +0.34).
    ctl = controllers.predictive(h_now + 0.1, vocab_size=4, coef_range=(0.0, 3.0),
                                 solver=solver, **kw)
    coef, state = ctl.update(ctl.init(), jnp.asarray(h_now), predict)
    if solver == "bisection":
      np.testing.assert_allclose(float(predict(coef)), 0.1, atol=1e-10)
    else:
      # The secant inside a bracket of width 0.5 misses a quadratic by its curvature term:
      # |f''| / 8 * width^2 with |f''| = |-Var_pi(grad H)|_rho (T1.4) -- here below 1e-3.
      np.testing.assert_allclose(float(state.predicted), 0.1, atol=1e-12)
      assert abs(float(predict(coef)) - 0.1) < 1e-3
    assert not bool(state.saturated)


def test_saturation_instead_of_nan():
  z, dz_pg, rho = _bonus_problem(np.float32)
  g = np_grad_entropy(z)
  predict = lambda c: ep.pooled_entropy_change(jnp.asarray(z), dz_pg + c * g, rho)
  h_now = float(rho @ np_entropy(z)[0])
  for solver in controllers.SOLVERS:
    # Far above: needs more bonus than c_max gives. Far below: would need a negative bonus.
    up = controllers.predictive(math.log(4), vocab_size=4, coef_range=(0.0, 0.1), solver=solver)
    coef, state = jax.jit(lambda s, h, c=up: c.update(s, h, predict))(up.init(),
                                                                    jnp.float32(h_now))
    assert float(coef) == pytest.approx(0.1) and bool(state.saturated)
    down = controllers.predictive(0.0, vocab_size=4, coef_range=(0.0, 0.1), solver=solver)
    coef, state = jax.jit(lambda s, h, c=down: c.update(s, h, predict))(down.init(),
                                                                      jnp.float32(h_now))
    assert float(coef) == 0.0 and bool(state.saturated) and not bool(state.nonfinite)


def test_flat_prediction_has_no_authority_and_stays_finite():
  ctl = controllers.predictive(0.5, vocab_size=4, coef_range=(0.0, 1.0), init_coef=0.3)
  coef, state = ctl.update(ctl.init(), jnp.float32(1.0), lambda c: 0.0 * c - 0.1)
  assert np.isfinite(float(coef)) and 0.0 <= float(coef) <= 1.0
  assert bool(state.saturated) and not bool(state.nonfinite)


@pytest.mark.parametrize("solver", ["secant", "bisection", "grid", "newton"])
def test_nonfinite_prediction_keeps_the_last_coefficient_and_is_flagged(solver):
  ctl = controllers.predictive(0.5, vocab_size=4, coef_range=(0.0, 1.0), init_coef=0.3,
                               solver=solver)
  state = ctl.init()
  coef, state = ctl.update(state, jnp.float32(1.0), lambda c: jnp.nan * c)
  assert float(coef) == pytest.approx(0.3)
  assert bool(state.nonfinite) and int(state.num_nonfinite) == 1
  coef, state = ctl.update(state, jnp.float32(1.0), lambda c: c - 0.5)
  assert not bool(state.nonfinite) and int(state.num_nonfinite) == 1
  coef, state = ctl.update(state, jnp.float32(1.0), lambda c: jnp.inf + c)
  assert bool(state.nonfinite) and int(state.num_nonfinite) == 2
  assert np.isfinite(float(coef))


def test_update_rejects_bad_inputs():
  ctl = controllers.predictive(0.5, vocab_size=4, coef_range=(0.0, 1.0))
  with pytest.raises(ValueError, match="predict"):
    ctl.update(ctl.init(), jnp.float32(1.0))
  with pytest.raises(ValueError, match="scalar"):
    ctl.update(ctl.init(), jnp.ones(3), lambda c: c)
  with pytest.raises(ValueError, match="scalar"):
    ctl.update(ctl.init(), jnp.float32(1.0), lambda c: jnp.ones(2) * c)
  with pytest.raises(TypeError, match="floating"):
    ctl.update(ctl.init(), jnp.int32(1), lambda c: c)
  with pytest.raises(ValueError, match="weights"):
    ep.pooled_entropy(jnp.zeros((3, 4)), jnp.ones(2))
  with pytest.raises(ValueError, match="order"):
    ep.pooled_entropy_change(jnp.zeros((3, 4)), jnp.zeros((3, 4)), order=3)


# ------------------------------------------------------------------------ reactive and PID


def np_reactive(entropies, target, delta, low, high, init, delay):
  """Skywork-OR1's rule from its definition (He et al. 2025), in NumPy."""
  level, coefs, prev_below = init, [], True
  for h, goal in zip(entropies, target):
    below = h < goal
    if delay:
      gate = prev_below
    else:
      level = min(max(level + (delta if below else -delta), low), high)
      gate = below
    coefs.append(level if gate else 0.0)
    if delay:
      level = min(max(level + (delta if below else -delta), low), high)
    prev_below = below
  return np.array(coefs)


def np_pid(entropies, target, kp, ki, kd, low, high, c0):
  integral, prev, coefs = 0.0, None, []
  for h, goal in zip(entropies, target):
    e = goal - h
    prev = e if prev is None else prev
    trial = integral + e
    raw = c0 + kp * e + ki * trial + kd * (e - prev)
    if not ((raw > high and e > 0) or (raw < low and e < 0)):
      integral = trial
    coefs.append(min(max(raw, low), high))
    prev = e
  return np.array(coefs)


def _run_rule(ctl, entropies):
  def body(state, h):
    coef, state = ctl.update(state, h)
    return state, coef

  return np.asarray(jax.jit(lambda hs: jax.lax.scan(body, ctl.init(), hs)[1])(entropies))


@pytest.mark.parametrize("delay", [0, 1])
def test_reactive_rule_matches_its_definition(delay):
  rng = np.random.default_rng(0)
  target = controllers.linear_target(1.2, 0.6, 30)
  hs = np.asarray(target(np.arange(40)), np.float64) + 0.2 * rng.standard_normal(40)
  hs = np.asarray(hs, np.float32)
  ctl = controllers.reactive(target, vocab_size=8, delta=0.07, coef_range=(0.0, 0.3),
                             init_coef=0.1, delay=delay)
  expected = np_reactive(hs, np.asarray(target(np.arange(40))), 0.07, 0.0, 0.3, 0.1, delay)
  np.testing.assert_allclose(_run_rule(ctl, hs), expected, atol=1e-6)


def test_pid_rule_matches_its_definition():
  rng = np.random.default_rng(1)
  target = controllers.exponential_target(1.5, 0.4, 10.0)
  hs = np.asarray(np.asarray(target(np.arange(50))) + 0.3 * rng.standard_normal(50), np.float32)
  ctl = controllers.pid(target, vocab_size=8, kp=0.8, ki=0.3, kd=0.2, coef_range=(0.0, 1.0),
                        init_coef=0.1)
  expected = np_pid(hs, np.asarray(target(np.arange(50))), 0.8, 0.3, 0.2, 0.0, 1.0, 0.1)
  np.testing.assert_allclose(_run_rule(ctl, hs), expected, atol=1e-5)


def test_fixed_controller_and_traced_gains():
  ctl = controllers.fixed(0.25, coef_range=(0.0, 1.0), target=0.5, vocab_size=4)
  coef, state = ctl.update(ctl.init(), jnp.float32(0.9))
  assert float(coef) == 0.25 and float(state.error) == pytest.approx(-0.4)

  def coef_for(delta):
    c = controllers.reactive(0.5, vocab_size=4, delta=delta, coef_range=(0.0, 1.0))
    return c.update(c.init(), jnp.float32(0.2))[0]

  np.testing.assert_allclose(jax.vmap(coef_for)(jnp.array([0.1, 0.2, 0.3])), [0.1, 0.2, 0.3],
                             rtol=1e-6)


@pytest.mark.parametrize("name", ["reactive", "pid", "predictive"])
def test_update_under_jit_equals_eager(name):
  kw = dict(vocab_size=4, coef_range=(0.0, 1.0))
  ctl = {"reactive": lambda: controllers.reactive(0.8, delta=0.1, **kw),
         "pid": lambda: controllers.pid(0.8, kp=0.5, ki=0.1, **kw),
         "predictive": lambda: controllers.predictive(0.8, **kw)}[name]()
  predict = lambda c: 0.3 * c - 0.1
  state, jstate = ctl.init(), ctl.init()
  step = jax.jit(lambda s, h: ctl.update(s, h, predict))
  for h in (1.0, 0.7, 0.9, 0.5):
    c, state = ctl.update(state, jnp.float32(h), predict)
    jc, jstate = step(jstate, jnp.float32(h))
    # float32 on values of order 1: fused jit code may round a last bit differently.
    assert float(c) == pytest.approx(float(jc), abs=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state, jstate)


_NAN, _INF = float("nan"), float("inf")
_RANGE = dict(vocab_size=4, coef_range=(0.0, 1.0))
_RULES = {
    "fixed": lambda: controllers.fixed(0.25, target=0.8, **_RANGE),
    "reactive": lambda: controllers.reactive(0.8, delta=0.1, init_coef=0.2, **_RANGE),
    "reactive_delay1": lambda: controllers.reactive(0.8, delta=0.1, init_coef=0.2, delay=1,
                                                    **_RANGE),
    "pid": lambda: controllers.pid(0.8, kp=0.5, ki=0.3, kd=0.2, init_coef=0.1, **_RANGE),
    "predictive": lambda: controllers.predictive(0.8, **_RANGE),
}


@pytest.mark.parametrize("bad", [_NAN, _INF, -_INF])
@pytest.mark.parametrize("name", list(_RULES))
def test_nonfinite_measurement_raises_when_concrete(name, bad):
  ctl = _RULES[name]()
  with pytest.raises(ValueError, match="entropy must be finite"):
    ctl.update(ctl.init(), jnp.float32(bad), lambda c: 0.3 * c - 0.1)


@pytest.mark.parametrize("name", list(_RULES))
def test_nonfinite_measurement_under_jit_is_skipped(name):
  """Under jit a NaN or inf reading skips its update (controllers.base): that update gets the
  previous strength, it is flagged, and every later strength and state is the one of the run
  without the bad readings (the target is constant, so the skipped steps' clock does not
  matter); nothing is NaN, also inside a switch."""
  predict = lambda c: 0.3 * c - 0.1
  clean = jnp.asarray([1.0, 0.7, 0.9, 0.5, 0.6], jnp.float32)
  dirty = jnp.asarray([1.0, 0.7, _NAN, 0.9, _INF, -_INF, 0.5, 0.6], jnp.float32)
  kept, bad = np.array([0, 1, 3, 6, 7]), np.array([2, 4, 5])

  def run(ctl, hs):
    def body(state, h):
      coef, state = ctl.update(state, h, predict)
      return state, (coef, state)

    return jax.jit(lambda hs: jax.lax.scan(body, ctl.init(), hs)[1])(hs)

  ctl = _RULES[name]()
  (c_clean, s_clean), (c_dirty, s_dirty) = run(ctl, clean), run(ctl, dirty)
  np.testing.assert_allclose(c_dirty[kept], c_clean, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(c_dirty[bad], c_dirty[bad - 1])
  np.testing.assert_array_equal(s_dirty.nonfinite, np.isin(np.arange(8), bad))
  for field in s_clean._fields:
    if field not in ("count", "nonfinite"):
      np.testing.assert_allclose(getattr(s_dirty, field)[kept], getattr(s_clean, field),
                                 rtol=1e-6, atol=1e-7, err_msg=field)
  np.testing.assert_array_equal(s_dirty.count, np.arange(1, 9))
  # The same rule as a switch's branch (the PID integral once stayed NaN there for good).
  both = controllers.switch(1, [_RULES["fixed"](), ctl])
  c_switch, s_switch = run(both, dirty)
  np.testing.assert_allclose(c_switch, c_dirty, rtol=1e-6, atol=1e-7)
  for leaf in jax.tree.leaves(s_switch):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert np.all(np.isfinite(leaf))


# -------------------------------------------------------------------------- many devices


def test_global_statistics_on_eight_devices_equal_one_device():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  key = jax.random.key(0)
  logits = 2.0 * jax.random.normal(key, (16, 6, 5), jnp.float32)
  g = covrl.entropy_grad(logits)
  dz0 = 0.1 * jax.random.normal(jax.random.key(1), logits.shape, jnp.float32)
  mask = jax.random.bernoulli(jax.random.key(2), 0.7, (16, 6))
  ctl = controllers.predictive(1.0, vocab_size=5, coef_range=(0.0, 3.0))

  def control(z, d0, grad, m, axis_name):
    h = ep.pooled_entropy(z, m, axis_name=axis_name)
    predict = lambda c: ep.pooled_entropy_change(z, d0 + c * grad, m,
                                                          axis_name=axis_name)
    coef, _ = ctl.update(ctl.init(), h, predict)
    return h, predict(0.7), coef

  one = control(logits, dz0, g, mask, None)
  sharded = jax.jit(jax.shard_map(
      lambda *a: control(*a, "data"), mesh=mesh,
      in_specs=(P("data"), P("data"), P("data"), P("data")), out_specs=(P(), P(), P())))
  many = sharded(logits, dz0, g, mask)
  for a, b in zip(one, many):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7)
  # The pooled statistics are the plain masked means.
  h_np = np_entropy(np.asarray(logits, np.float64))[0]
  np.testing.assert_allclose(float(one[0]), h_np[np.asarray(mask)].mean(), rtol=1e-5)


# -------------------------------------------------------------------- the tabular loop


_BANDIT = bandits.Bandit((0.9, 0.6, 0.4, 0.1), noise="bernoulli")


def _sampled(num_steps=40, control=None, **kw):
  control = covrl.EntropyBonus(1.0) if control is None else control
  base = dict(dynamics="sampled", control=control, step_size=1.0,
              num_steps=num_steps, advantage="grpo", num_samples=32, group_size=8,
              record_every=5)
  base.update(kw)
  return tabular.TabularConfig(_BANDIT, **base)


def test_fixed_controller_reproduces_the_uncontrolled_tabular_run():
  cfg = _sampled(control=covrl.EntropyBonus(0.3))
  plain = jax.jit(tabular.make_train(cfg))(jax.random.key(3))
  ctl = controllers.fixed(0.3, coef_range=(0.0, 1.0))
  out = jax.jit(tabular.make_controlled_train(cfg, ctl, 0.5))(jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(plain.logits))
  np.testing.assert_array_equal(np.asarray(out.entropy[::5]), np.asarray(plain.entropy))
  # The gap is computed from equal logits by two different programs: jax 0.12 rounds one of
  # nine values one float32 ulp apart (bit-equal with jax 0.10).
  np.testing.assert_allclose(np.asarray(out.gap[::5]), np.asarray(plain.gap),
                             rtol=2 * np.finfo(np.float32).eps, atol=0)


def test_controlled_run_same_key_same_result_and_sharded_equals_one_device():
  cfg = _sampled(num_steps=20)
  path = controllers.linear_target(math.log(4), 0.6, 30)
  ctl = controllers.predictive(path, vocab_size=4, coef_range=(0.0, 2.0))
  keys = jax.random.split(jax.random.key(0), 8)
  a = tabular.run_controlled(cfg, ctl, path, keys)
  b = tabular.run_controlled(cfg, ctl, path, keys)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  if jax.device_count() >= 8:
    c = tabular.run_controlled(cfg, ctl, path, keys, mesh=tabular.data_mesh(8))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, c)


def test_exact_pg_predictive_tracks_to_second_order():
  """Exact PG with the bonus knob: the first-order prediction meets the target exactly, so the
  actual miss is the T1.2 remainder, at most 1/2 (1 + 2 log V) osc(dz)^2 per state."""
  with enable_x64(True):
    cfg = tabular.TabularConfig(bandits.Bandit(((1.0, 0.7, 0.2, 0.0), (0.1, 0.9, 0.5, 0.3))),
                                dynamics="pg", control=covrl.EntropyBonus(1.0), step_size=2.0,
                                num_steps=60, dtype="float64")
    path = controllers.linear_target(1.3, 0.7, 60)
    ctl = controllers.predictive(path, vocab_size=4, coef_range=(0.0, 5.0))
    out = jax.jit(tabular.make_controlled_train(cfg, ctl, path))(jax.random.key(0))
    h, goal = np.asarray(out.entropy), np.asarray(out.target)
    free = ~np.asarray(out.saturated)
    assert free.mean() > 0.8
    # Before update t the controller asked for h_t + predicted_t = H*(t+1).
    np.testing.assert_allclose((h[:-1] + np.asarray(out.predicted))[free], goal[1:][free],
                               atol=1e-10)
    # NumPy replay of exact PG with the recorded coefficients: the same entropies, and the miss
    # of every unsaturated update within the T1.2 remainder bound of its own logit update.
    r, rho = cfg.bandit.r, cfg.bandit.rho
    z, bound = np.zeros((2, 4)), []
    for t, alpha in enumerate(np.asarray(out.coef)):
      hz, p = np_entropy(z)
      np.testing.assert_allclose(rho @ hz, h[t], rtol=1e-12)
      adv = r - (p * r).sum(-1, keepdims=True)
      dz = 2.0 * rho[:, None] * (p * adv + alpha * np_grad_entropy(z))
      osc = dz.max(-1) - dz.min(-1)
      bound.append(rho @ (0.5 * (1 + 2 * np.log(4)) * osc**2))
      z = z + dz
    miss = np.abs(h[1:] - goal[1:])
    assert np.all(miss[free] <= np.asarray(bound)[free])
    assert miss[free].max() < 1e-2


@pytest.mark.parametrize("control,coef_range,solver", [
    ("kl_cov", (0.0, 5.0), "bisection"),
    ("clip_cov", (0.0, 0.5), "bisection"),
])
def test_covariance_knobs_run_inside_their_range(control, coef_range, solver):
  if control == "kl_cov":
    cfg = _sampled(num_steps=10, control=covrl.KLCov(kl_cov_ratio=0.2, ppo_kl_coef=1.0),
                   ppo_epochs=2, num_minibatches=2)
  else:
    cfg = _sampled(num_steps=10, control=covrl.ClipCov(clip_cov_ratio=0.2, clip_cov_lb=-10.0,
                                                       clip_cov_ub=10.0))
  path = controllers.constant_target(1.0)
  ctl = controllers.predictive(path, vocab_size=4, coef_range=coef_range, solver=solver,
                               num_iters=6)
  out = jax.jit(tabular.make_controlled_train(cfg, ctl, path))(jax.random.key(1))
  coef = np.asarray(out.coef)
  assert np.all((coef >= coef_range[0]) & (coef <= coef_range[1]))
  assert np.all(np.isfinite(np.asarray(out.entropy)))
  assert not np.asarray(out.nonfinite).any()
  assert np.asarray(out.touched_frac).max() <= 1.0


def test_controlled_loop_rejects_bad_setups():
  path = controllers.constant_target(0.8)
  good = controllers.predictive(path, vocab_size=4, coef_range=(0.0, 1.0))
  with pytest.raises(ValueError, match="vocab_size"):
    tabular.make_controlled_train(
        _sampled(), controllers.predictive(0.8, vocab_size=5, coef_range=(0.0, 1.0)), path)
  with pytest.raises(ValueError, match="no strength"):
    tabular.make_controlled_train(_sampled(control=covrl.NoControl()), good, path)
  with pytest.raises(ValueError, match="fraction"):
    tabular.make_controlled_train(
        _sampled(control=covrl.ClipCov()),
        controllers.predictive(path, vocab_size=4, coef_range=(0.0, 2.0)), path)
  with pytest.raises(ValueError, match=r"log V"):
    tabular.make_controlled_train(_sampled(), good, 3.0)
  with pytest.raises(TypeError):
    tabular.make_controlled_train(_sampled(), "predictive", path)


def test_switch_runs_the_indexed_controller_and_vmaps_over_the_index():
  kw = dict(vocab_size=4, coef_range=(0.0, 1.0))
  branches = [controllers.fixed(0.2, coef_range=(0.0, 1.0)),
              controllers.reactive(0.8, delta=0.1, init_coef=0.3, **kw),
              controllers.pid(0.8, kp=0.5, ki=0.1, **kw),
              controllers.predictive(0.8, **kw)]
  predict = lambda c: 0.3 * c - 0.1
  hs = jnp.asarray([1.0, 0.7, 0.9, 0.5], jnp.float32)

  def run(ctl):
    def body(state, h):
      coef, state = ctl.update(state, h, predict)
      return state, coef
    return jax.lax.scan(body, ctl.init(), hs)[1]

  alone = np.stack([np.asarray(run(b)) for b in branches])
  together = jax.jit(jax.vmap(lambda i: run(controllers.switch(i, branches))))(jnp.arange(4))
  np.testing.assert_allclose(np.asarray(together), alone, atol=1e-6)
  with pytest.raises(ValueError, match="coef_range"):
    controllers.switch(0, [branches[0], controllers.fixed(0.2, coef_range=(0.0, 2.0))])
  with pytest.raises(ValueError, match="index"):
    controllers.switch(4, branches)


def test_affine_shortcut_equals_rerunning_the_step():
  with enable_x64(True):
    cfg = _sampled(num_steps=10, dtype="float64")
    path = controllers.linear_target(math.log(4), 0.6, 10)
    ctl = controllers.predictive(path, vocab_size=4, coef_range=(0.0, 2.0))
    runs = [jax.jit(tabular.make_controlled_train(cfg, ctl, path, affine=a))(
        jax.random.key(4)) for a in (True, False)]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12), *runs)
  with pytest.raises(ValueError, match="affine"):
    tabular.make_controlled_train(_sampled(num_minibatches=2), ctl, path, affine=True)


def test_controlled_bonus_transform_equals_the_core_bonus_at_the_chosen_coefficient():
  """With SGD the wrapper's update is the core bonus transform at c, then sgd, at the c it chose."""
  with enable_x64(True):
    z = jnp.asarray([[2.0, 0.5, -1.0, 0.0], [0.3, -0.2, 0.1, 1.5]])
    g = jnp.asarray([[-0.3, 0.1, 0.1, 0.1], [0.05, -0.2, 0.05, 0.1]])
    h = float(ep.pooled_entropy(z))
    ctl = controllers.predictive(h + 0.05, vocab_size=4, coef_range=(0.0, 10.0))
    opt = controllers.controlled_entropy_bonus(ctl, optax.sgd(0.5))
    dz, state = opt.update(g, opt.init(z), z)
    coef = float(state.controller.coef)
    assert 0 < coef < 10 and not bool(state.controller.saturated)
    # The core transform's bonus is per state; the pooled (mean over the 2 states) entropy's
    # gradient is half of it, so the same step needs coef / 2 there.
    ref = optax.chain(covrl.transform(covrl.EntropyBonus(coef / 2)), optax.sgd(0.5))
    expected, _ = ref.update(g, ref.init(z), z)
    np.testing.assert_allclose(np.asarray(dz), np.asarray(expected), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(float(ep.pooled_entropy_change(z, dz)), 0.05, atol=1e-6)
    with pytest.raises(ValueError, match="vocab_size"):
      opt.update(g[:, :3], opt.init(z[:, :3]), z[:, :3])


def test_controlled_bonus_with_adam_and_bisection_meets_the_prediction():
  z = jnp.asarray([1.5, 0.0, -0.5, -1.0, 0.2], jnp.float32)
  ctl = controllers.predictive(float(covrl.entropy(z)), vocab_size=5, coef_range=(0.0, 5.0),
                               solver="bisection", num_iters=30)
  opt = controllers.controlled_entropy_bonus(ctl, optax.adam(0.05))
  g = jnp.asarray([-0.3, 0.1, 0.1, 0.05, 0.05], jnp.float32)
  update = jax.jit(opt.update)
  # Adam's first step is -lr sign(g - c grad H): piecewise constant in c, so it is taken once
  # here; from the second step on the update is smooth in c and bisection meets the target.
  dz, state = update(g, opt.init(z), z)
  z = z + dz
  ctl_state = state.controller._replace(count=jnp.zeros((), jnp.int32))
  state = state._replace(controller=ctl_state)
  ctl = controllers.predictive(float(covrl.entropy(z)) + 0.02, vocab_size=5,
                               coef_range=(0.0, 5.0), solver="bisection", num_iters=30)
  opt = controllers.controlled_entropy_bonus(ctl, optax.adam(0.05))
  dz, state = jax.jit(opt.update)(0.5 * g, state, z)
  np.testing.assert_allclose(float(ep.pooled_entropy_change(z, dz)), 0.02, atol=1e-5)
  assert not bool(state.controller.saturated)
  assert int(state.inner[0].count) == 2  # the wrapped Adam advanced exactly once per update


def test_grid_finds_the_first_bracket_of_a_non_monotone_prediction():
  # f rises then falls (a large step's second-order term): bisection on [0, 10] sees no sign
  # change at the ends and saturates; the grid finds the crossing on the rising side.
  f = lambda c: 0.4 * c - 0.05 * c**2  # peak 0.8 at c = 4; f(10) = -1
  kw = dict(vocab_size=4, coef_range=(0.0, 10.0))
  grid = controllers.predictive(1.0, solver="grid", num_points=11, **kw)
  bis = controllers.predictive(1.0, solver="bisection", **kw)
  h = jnp.float32(0.7)  # desired change 0.3: f(c) = 0.3 at c = 4 -+ sqrt(10)
  coef, state = grid.update(grid.init(), h, f)
  # The secant in the bracket [0, 1] gives 0.3 / f(1) = 0.857; the root is 0.838.
  assert float(coef) == pytest.approx(0.3 / 0.35, rel=1e-5) and not bool(state.saturated)
  assert abs(float(coef) - (4 - math.sqrt(10))) < 0.03
  coef, state = bis.update(bis.init(), h, f)
  assert bool(state.saturated) and float(coef) == 0.0  # f(0) = 0 is nearer 0.3 than f(10)

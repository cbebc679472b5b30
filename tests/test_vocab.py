"""covrl.vocab: chunked log pi(y), entropy and first-order entropy change from hidden states.

Expected values come from NumPy float64 references written here (log-softmax, entropy, the
closed-form gradients through z = (h W + b) / tau), from the unfused JAX path
(`jax.nn.log_softmax` + `covrl.entropy` on materialised logits) and from float64 finite
differences. Every test passes with JAX's 64-bit mode on or off: float32 inputs are built
explicitly, float64 runs inside `enable_x64(True)`.
"""

import doctest

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import covrl
from covrl import _compat
from covrl import vocab as vocab_module

F32 = np.finfo(np.float32).eps


def problem(seed, lead=(3, 5), d=6, v=37, *, vocab_mask=True, mask=True, scale=1.0):
  """Random float64 NumPy inputs; masked positions hold NaN hidden states and bad token ids."""
  rng = np.random.default_rng(seed)
  h = rng.standard_normal((*lead, d)) * scale
  w = rng.standard_normal((d, v)) * scale
  b = rng.standard_normal(v)
  y = rng.integers(0, v, lead)
  m = rng.random(lead) > 0.3 if mask else np.ones(lead, bool)
  vm = rng.random(v) > 0.25 if vocab_mask else np.ones(v, bool)
  vm[y[m]] = True  # sampled tokens have probability > 0
  h = np.where(m[..., None], h, np.nan)
  y = np.where(m, y, -7)
  return dict(h=h, w=w, b=b, y=y, mask=m, vm=vm)


def np_reference(p, tau=1.0, use_bias=True, use_vm=True, g_logp=None, g_ent=None):
  """(log_prob, entropy) and, given cotangents, (dh, dW, db) in float64 NumPy."""
  m, y = p["mask"], np.where(p["mask"], p["y"], 0)
  h = np.where(m[..., None], p["h"], 0.0)
  z = (h @ p["w"] + (p["b"] if use_bias else 0.0)) / tau
  support = p["vm"] if use_vm else np.ones_like(p["vm"])
  z = np.where(support, z, -np.inf)
  top = z.max(-1, keepdims=True)
  lse = top + np.log(np.sum(np.exp(z - top), -1, keepdims=True))
  logp = np.where(support, z - lse, 0.0)
  prob = np.where(support, np.exp(logp), 0.0)
  ent = -np.sum(prob * logp, -1)
  lp_y = np.take_along_axis(z - lse, y[..., None], -1)[..., 0]
  out = (np.where(m, lp_y, 0.0), np.where(m, ent, 0.0))
  if g_logp is None:
    return out
  onehot = np.eye(z.shape[-1])[y]
  gl, ge = np.where(m, g_logp, 0.0)[..., None], np.where(m, g_ent, 0.0)[..., None]
  g = gl * (onehot - prob) - ge * prob * (logp + ent[..., None])
  g = np.where(support, g, 0.0) / tau
  d = h.shape[-1]
  dh = g @ p["w"].T
  dw = h.reshape(-1, d).T @ g.reshape(-1, z.shape[-1])
  db = g.reshape(-1, z.shape[-1]).sum(0)
  return out, (dh, dw, db)


def fused(p, dtype, tau=1.0, use_bias=True, use_vm=True, **chunks):
  args = (jnp.asarray(p["h"], dtype), jnp.asarray(p["w"], dtype), jnp.asarray(p["y"]))
  kw = dict(bias=jnp.asarray(p["b"], dtype) if use_bias else None, mask=jnp.asarray(p["mask"]),
            vocab_mask=jnp.asarray(p["vm"]) if use_vm else None, temperature=tau, **chunks)
  return args, kw


CHUNKS = [
    dict(token_chunk=4, vocab_chunk=8),  # remainders on both axes
    dict(token_chunk=1, vocab_chunk=1),
    dict(token_chunk=15, vocab_chunk=37),  # one chunk each
    dict(token_chunk=5, vocab_chunk=100),  # vocab_chunk > V
    dict(token_chunk=1000, vocab_chunk=12),
]


@pytest.mark.parametrize("chunks", CHUNKS)
@pytest.mark.parametrize("use_bias,use_vm,tau", [(True, True, 0.7), (False, False, 1.0),
                                                 (True, False, 1.3)])
def test_float64_values_and_gradients_match_numpy(chunks, use_bias, use_vm, tau):
  p = problem(0)
  rng = np.random.default_rng(1)
  g_logp, g_ent = rng.standard_normal(p["y"].shape), rng.standard_normal(p["y"].shape)
  (lp_ref, ent_ref), grads_ref = np_reference(p, tau, use_bias, use_vm, g_logp, g_ent)
  with _compat.enable_x64(True):
    (h, w, y), kw = fused(p, jnp.float64, tau, use_bias, use_vm, **chunks)
    lp, ent = covrl.token_log_probs_and_entropy(h, w, y, **kw)
    assert lp.dtype == ent.dtype == jnp.float64
    np.testing.assert_allclose(lp, lp_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ent, ent_ref, rtol=1e-12, atol=1e-12)

    def loss(h, w, b):
      lp, ent = covrl.token_log_probs_and_entropy(h, w, y, **{**kw, "bias": b})
      return jnp.sum(lp * g_logp) + jnp.sum(ent * g_ent)

    b = kw["bias"] if use_bias else jnp.asarray(p["b"])
    grads = jax.grad(loss, argnums=(0, 1, 2) if use_bias else (0, 1))(h, w, b if use_bias
                                                                        else None)
    for got, want in zip(grads, grads_ref):
      np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)
    # Masked positions: value 0 and zero gradient, although their hidden states are NaN.
    assert np.all(np.asarray(grads[0])[~p["mask"]] == 0)
    assert np.isfinite(np.asarray(grads[0])).all()


def test_float64_finite_differences():
  p = problem(2, lead=(2, 3), d=3, v=7, mask=True)
  h0 = np.where(p["mask"][..., None], p["h"], 0.0)
  with _compat.enable_x64(True):
    y, m, vm = jnp.asarray(p["y"]), jnp.asarray(p["mask"]), jnp.asarray(p["vm"])
    rng = np.random.default_rng(3)
    g1, g2 = jnp.asarray(rng.standard_normal(y.shape)), jnp.asarray(rng.standard_normal(y.shape))

    def f(h, w, b):
      lp, ent = covrl.token_log_probs_and_entropy(h, w, y, bias=b, mask=m, vocab_mask=vm,
                                                  temperature=0.8, token_chunk=2, vocab_chunk=3)
      return jnp.sum(g1 * lp) + jnp.sum(g2 * ent)

    check_grads(f, (jnp.asarray(h0), jnp.asarray(p["w"]), jnp.asarray(p["b"])),
                order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("chunks", CHUNKS[:3])
def test_float32_matches_unfused_to_round_off(chunks):
  p = problem(4, lead=(4, 8), d=16, v=61, scale=1.5)
  rng = np.random.default_rng(5)
  g_logp, g_ent = rng.standard_normal(p["y"].shape), rng.standard_normal(p["y"].shape)
  (lp_ref, ent_ref), grads_ref = np_reference(p, 0.9, True, True, g_logp, g_ent)
  (h, w, y), kw = fused(p, jnp.float32, 0.9, **chunks)
  mask, vm = kw["mask"], kw["vocab_mask"]
  gl, ge = jnp.asarray(g_logp, jnp.float32), jnp.asarray(g_ent, jnp.float32)

  def fused_loss(h, w, b):
    lp, ent = covrl.token_log_probs_and_entropy(h, w, y, **{**kw, "bias": b})
    return jnp.sum(lp * gl) + jnp.sum(ent * ge), (lp, ent)

  def unfused_loss(h, w, b):
    h = jnp.where(mask[..., None], h, 0.0)
    z = jnp.where(vm, (h @ w + b) / 0.9, -jnp.inf)
    safe_y = jnp.where(mask, y, 0)
    lp = jnp.take_along_axis(jax.nn.log_softmax(z), safe_y[..., None], -1)[..., 0]
    lp, ent = jnp.where(mask, lp, 0.0), jnp.where(mask, covrl.entropy(z), 0.0)
    return jnp.sum(lp * gl) + jnp.sum(ent * ge), (lp, ent)

  args = (h, w, kw["bias"])
  results = {}
  for name, fn in (("fused", fused_loss), ("unfused", unfused_loss)):
    (_, outs), grads = jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True)(*args)
    results[name] = [*outs, *grads]
  refs = [lp_ref, ent_ref, *grads_ref]
  for got, base, want in zip(results["fused"], results["unfused"], refs):
    assert got.dtype == jnp.float32
    got, base = np.asarray(got, np.float64), np.asarray(base, np.float64)
    scale = np.max(np.abs(want))
    # Round-off of a length-(D + V) float32 computation on O(scale) numbers; the unfused path
    # must meet the same bound (so the bound is float32's, not the chunking's).
    tol = 64 * F32 * scale
    assert np.max(np.abs(got - want)) <= tol
    assert np.max(np.abs(base - want)) <= tol


def test_bfloat16_inputs_accumulate_in_float32():
  p = problem(6, lead=(2, 8), d=32, v=50)
  h16 = jnp.asarray(np.nan_to_num(p["h"]), jnp.bfloat16)
  w16 = jnp.asarray(p["w"], jnp.bfloat16)
  y, mask = jnp.asarray(p["y"]), jnp.asarray(p["mask"])
  # The bf16 values are exact in float64: the reference sees exactly the inputs the function got.
  q = dict(p, h=np.where(p["mask"][..., None], np.asarray(h16, np.float64), np.nan),
           w=np.asarray(w16, np.float64))
  rng = np.random.default_rng(7)
  g_logp, g_ent = rng.standard_normal(y.shape), rng.standard_normal(y.shape)
  (lp_ref, ent_ref), (dh_ref, dw_ref, _) = np_reference(q, 1.0, False, False, g_logp, g_ent)
  gl, ge = jnp.asarray(g_logp, jnp.float32), jnp.asarray(g_ent, jnp.float32)

  def loss(h, w):
    lp, ent = covrl.token_log_probs_and_entropy(h, w, y, mask=mask, token_chunk=3, vocab_chunk=7)
    return jnp.sum(lp * gl) + jnp.sum(ent * ge), (lp, ent)

  (_, (lp, ent)), (dh, dw) = jax.value_and_grad(loss, (0, 1), has_aux=True)(h16, w16)
  assert lp.dtype == ent.dtype == jnp.float32
  assert dh.dtype == dw.dtype == jnp.bfloat16
  for got, want in ((lp, lp_ref), (ent, ent_ref)):
    np.testing.assert_allclose(got, want, atol=64 * F32 * np.max(np.abs(want)))
  # Gradients: float32 accumulation, then one rounding to bfloat16 (8 bits of mantissa).
  for got, want in ((dh, dh_ref), (dw, dw_ref)):
    got = np.asarray(got.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(got, want, rtol=2**-8, atol=1e-3 * np.max(np.abs(want)))


def test_jit_equals_eager_and_outputs_feed_the_losses():
  p = problem(8, lead=(4, 6), d=8, v=40)
  (h, w, y), kw = fused(p, jnp.float32, 1.0, token_chunk=5, vocab_chunk=16)
  mask = kw["mask"]
  rng = np.random.default_rng(9)
  old = jnp.asarray(rng.standard_normal(y.shape) * 0.1 - 3.0, jnp.float32)
  adv = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)

  def fused_loss(h, w, b):
    lp, ent = covrl.token_log_probs_and_entropy(h, w, y, **{**kw, "bias": b})
    pg, _ = covrl.kl_cov_loss(old, lp, adv, mask, kl_cov_ratio=0.2)
    return pg - 0.01 * covrl.aggregate(ent, mask).value

  def unfused_loss(h, w, b):
    z = jnp.where(kw["vocab_mask"], jnp.where(mask[..., None], h, 0.0) @ w + b, -jnp.inf)
    lp = jnp.take_along_axis(jax.nn.log_softmax(z), jnp.where(mask, y, 0)[..., None], -1)[..., 0]
    pg, _ = covrl.kl_cov_loss(old, lp, adv, mask, kl_cov_ratio=0.2)
    bonus, _ = covrl.entropy_bonus_loss(z, mask, coef=0.01)
    return pg + bonus

  args = (h, w, kw["bias"])
  eager = jax.value_and_grad(fused_loss, (0, 1, 2))(*args)
  jitted = jax.jit(jax.value_and_grad(fused_loss, (0, 1, 2)))(*args)
  unfused = jax.jit(jax.value_and_grad(unfused_loss, (0, 1, 2)))(*args)
  for a, b, c in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), jax.tree.leaves(unfused)):
    a, b, c = (np.asarray(x, np.float64) for x in (a, b, c))
    tol = 64 * F32 * max(np.max(np.abs(c)), 1e-3)
    np.testing.assert_allclose(a, b, atol=tol)
    np.testing.assert_allclose(a, c, atol=tol)


@pytest.mark.parametrize("control", [covrl.EntropyBonus(0.05), covrl.KLCov(kl_cov_ratio=0.2)],
                         ids=["bonus", "kl_cov"])
def test_policy_loss_takes_the_fused_entropy_in_place_of_logits(control):
  """covrl.policy_loss(control, ..., entropy=H) with the fused outputs gives the loss, metrics
  and gradients of policy_loss(control, ..., logits=z) on the materialised logits."""
  p = problem(14, lead=(4, 6), d=8, v=40)
  (h, w, y), kw = fused(p, jnp.float32, 0.7, token_chunk=5, vocab_chunk=16)
  mask, tau = kw["mask"], kw["temperature"]
  rng = np.random.default_rng(15)
  old = jnp.asarray(rng.standard_normal(y.shape) * 0.1 - 3.0, jnp.float32)
  adv = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)

  def fused_loss(h, w, b):
    lp, ent = covrl.token_log_probs_and_entropy(h, w, y, **{**kw, "bias": b})
    return covrl.policy_loss(control, old, lp, adv, mask, entropy=ent, temperature=tau)

  def unfused_loss(h, w, b):
    raw = jnp.where(kw["vocab_mask"], jnp.where(mask[..., None], h, 0.0) @ w + b, -jnp.inf)
    lp = jnp.take_along_axis(jax.nn.log_softmax(raw / tau), jnp.where(mask, y, 0)[..., None],
                             -1)[..., 0]
    return covrl.policy_loss(control, old, lp, adv, mask, logits=raw, temperature=tau)

  args = (h, w, kw["bias"])
  (loss_f, m_f), g_f = jax.jit(jax.value_and_grad(fused_loss, (0, 1, 2), has_aux=True))(*args)
  (loss_u, m_u), g_u = jax.jit(jax.value_and_grad(unfused_loss, (0, 1, 2), has_aux=True))(*args)
  # loss_entropy_change needs the logits: the logits path only.
  assert sorted(m_f) == sorted(set(m_u) - {"loss_entropy_change"})
  for k in m_f:
    np.testing.assert_allclose(m_f[k], m_u[k], atol=64 * F32 * max(abs(float(m_u[k])), 1.0),
                               err_msg=k)
  np.testing.assert_allclose(loss_f, loss_u, atol=64 * F32 * max(abs(float(loss_u)), 1.0))
  for a, c in zip(g_f, g_u):
    c = np.asarray(c, np.float64)
    np.testing.assert_allclose(a, c, atol=64 * F32 * max(np.max(np.abs(c)), 1e-3))
  if isinstance(control, covrl.EntropyBonus):
    assert float(m_f["entropy_coef"]) == pytest.approx(0.05)


def test_entropy_bonus_loss_takes_exactly_one_of_logits_and_entropy():
  z, m = jnp.zeros((2, 3, 4)), jnp.ones((2, 3))
  with pytest.raises(ValueError, match="exactly one"):
    covrl.entropy_bonus_loss(z, m, coef=0.1, entropy=jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="exactly one"):
    covrl.entropy_bonus_loss(None, m, coef=0.1)
  with pytest.raises(ValueError, match="shape"):
    covrl.entropy_bonus_loss(None, m, coef=0.1, entropy=jnp.zeros((2, 4)))


def mesh8():
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_eight_devices_equal_one():
  p = problem(10, lead=(16, 6), d=8, v=45)
  (h, w, y), kw = fused(p, jnp.float32, 0.8, token_chunk=16, vocab_chunk=16)
  mask, vm, b = kw.pop("mask"), kw.pop("vocab_mask"), kw.pop("bias")
  gl = jnp.asarray(np.random.default_rng(11).standard_normal(y.shape), jnp.float32)

  def per_token(h, w, b, y, mask):
    lp, ent = covrl.token_log_probs_and_entropy(h, w, y, bias=b, mask=mask, vocab_mask=vm, **kw)
    return lp, ent

  def loss(h, w, b, y, mask, gl):
    lp, ent = per_token(h, w, b, y, mask)
    return jnp.sum(lp * gl) + jnp.sum(ent), (lp, ent)

  vg = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)
  one = jax.jit(vg)(h, w, b, y, mask, gl)
  mesh = mesh8()
  rows = NamedSharding(mesh, P("data"))
  put = lambda x: jax.device_put(x, rows)
  sharded = jax.jit(vg)(put(h), w, b, put(y), put(mask), put(gl))

  # shard_map: every output is per token, so the local call needs no axis name; the kernel's
  # gradient is summed over devices by shard_map's transpose of the replicated input.
  def local(h, w, b, y, mask, gl):
    lp, ent = per_token(h, w, b, y, mask)
    return jnp.sum(lp * gl) + jnp.sum(ent), (lp, ent)

  def sm_loss(h, w, b, y, mask, gl):
    total, outs = jax.shard_map(
        lambda *a: (jax.lax.psum(local(*a)[0], "data"), local(*a)[1]), mesh=mesh,
        in_specs=(P("data"), P(), P(), P("data"), P("data"), P("data")),
        out_specs=(P(), P("data")))(h, w, b, y, mask, gl)
    return total, outs

  mapped = jax.jit(jax.value_and_grad(sm_loss, (0, 1, 2), has_aux=True))(h, w, b, y, mask, gl)
  for got in (sharded, mapped):
    for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(one)):
      a, c = np.asarray(a, np.float64), np.asarray(c, np.float64)
      np.testing.assert_allclose(a, c, atol=64 * F32 * max(np.max(np.abs(c)), 1.0))

  # The entropy and its first-order change, likewise.
  dh = jnp.asarray(np.random.default_rng(12).standard_normal(h.shape), jnp.float32)
  dw = jnp.asarray(np.random.default_rng(13).standard_normal(w.shape), jnp.float32)

  def change(h, dh, mask, w, dw):
    return covrl.token_entropy_and_change(h, w, dh, dw, bias=b, mask=mask, vocab_mask=vm, **kw)

  one = jax.jit(change)(h, dh, mask, w, dw)
  sharded = jax.jit(change)(put(h), put(dh), put(mask), w, dw)
  mapped = jax.jit(jax.shard_map(change, mesh=mesh, in_specs=(P("data"),) * 3 + (P(), P()),
                                 out_specs=P("data")))(h, dh, mask, w, dw)
  for got in (sharded, mapped):
    for a, c in zip(got, one):
      np.testing.assert_allclose(a, c, atol=64 * F32 * max(np.max(np.abs(np.asarray(c))), 1.0))


def test_entropy_and_first_order_change_match_the_unfused_definitions():
  p = problem(12, lead=(3, 7), d=5, v=29)
  rng = np.random.default_rng(13)
  dh, dw, db = (rng.standard_normal(s) for s in (p["h"].shape, p["w"].shape, (29,)))
  h = np.where(p["mask"][..., None], p["h"], 0.0)
  tau = 0.6
  with _compat.enable_x64(True):
    z = jnp.where(p["vm"], (h @ p["w"] + p["b"]) / tau, -jnp.inf)
    dz = (dh @ p["w"] + h @ dw + db) / tau
    ent_ref = np.where(p["mask"], covrl.entropy(z), 0.0)
    change_ref = np.where(p["mask"], covrl.entropy_change_first_order(z, dz), 0.0)
    # The directional derivative of the unfused entropy along the tangent, independently.
    _, jvp = jax.jvp(lambda h, w, b: covrl.entropy(
        jnp.where(p["vm"], (h @ w + b) / tau, -jnp.inf)), (h, p["w"], p["b"]), (dh, dw, db))
    for chunks in CHUNKS:
      ent, change = covrl.token_entropy_and_change(
          jnp.asarray(p["h"]), jnp.asarray(p["w"]), jnp.asarray(dh), jnp.asarray(dw),
          bias=jnp.asarray(p["b"]), d_bias=jnp.asarray(db), mask=p["mask"], vocab_mask=p["vm"],
          temperature=tau, **chunks)
      np.testing.assert_allclose(ent, ent_ref, rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(change, change_ref, rtol=1e-10, atol=1e-12)
      np.testing.assert_allclose(change, np.where(p["mask"], jvp, 0.0), rtol=1e-10, atol=1e-12)
    # Only some tangents: the others count as zero.
    _, only_h = covrl.token_entropy_and_change(jnp.asarray(p["h"]), jnp.asarray(p["w"]),
                                               jnp.asarray(dh), bias=jnp.asarray(p["b"]),
                                               mask=p["mask"], vocab_mask=p["vm"],
                                               temperature=tau, vocab_chunk=8)
    want = covrl.entropy_change_first_order(z, dh @ p["w"] / tau)
    np.testing.assert_allclose(only_h, np.where(p["mask"], want, 0.0), rtol=1e-10, atol=1e-12)
    # Pooled over the mask: the controllers' predictor.
    pooled = covrl.pooled_entropy_change(z, dz, p["mask"])
    np.testing.assert_allclose(covrl.masked_mean(change, p["mask"]), pooled, rtol=1e-10)


def test_first_order_change_is_shift_invariant_in_float32():
  """A constant added to dz (here through d_bias) changes nothing: -Cov(log pi, dz + c) =
  -Cov(log pi, dz). Merging centred co-moments keeps this in float32 even for a large c, where
  E[x y] - E[x] E[y] would cancel catastrophically."""
  p = problem(14, lead=(4, 4), d=8, v=300, vocab_mask=False, mask=False)
  rng = np.random.default_rng(15)
  dh = jnp.asarray(rng.standard_normal(p["h"].shape), jnp.float32)
  h, w = jnp.asarray(p["h"], jnp.float32), jnp.asarray(p["w"], jnp.float32)
  base_kw = dict(token_chunk=4, vocab_chunk=32)
  _, base = covrl.token_entropy_and_change(h, w, dh, **base_kw)
  with _compat.enable_x64(True):
    z = np.asarray(p["h"]) @ p["w"]
    want = covrl.entropy_change_first_order(jnp.asarray(z), jnp.asarray(np.asarray(dh) @ p["w"]))
  _, shifted = covrl.token_entropy_and_change(h, w, dh, d_bias=jnp.full((300,), 1e4, jnp.float32),
                                              **base_kw)
  scale = np.max(np.abs(want))
  np.testing.assert_allclose(base, want, atol=1e-5 * scale)
  # 1e4 of offset costs float32 dz its last ~14 bits (dz + 1e4 rounds to 1e-3): the change is
  # still right to that precision, not lost to the 1e4 * E[z] cancellation.
  np.testing.assert_allclose(shifted, want, atol=2e-3 * scale)


def test_entropy_at_extreme_logits_float32():
  """Logits with a large common offset and a near-deterministic policy: the streaming sums
  (all terms of one sign) keep float32 accuracy."""
  d, v = 4, 1000
  rng = np.random.default_rng(16)
  w = rng.standard_normal((d, v))
  h = np.array([[30.0, 0, 0, 0], [0.01, 0, 0, 0]])
  b = np.full(v, 500.0)
  y = np.array([int(np.argmax(h[0] @ w)), 3])
  p = dict(h=h, w=w, b=b, y=y, mask=np.ones(2, bool), vm=np.ones(v, bool))
  lp_ref, ent_ref = np_reference(p)
  lp, ent = covrl.token_log_probs_and_entropy(
      jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(y),
      bias=jnp.asarray(b, jnp.float32), vocab_chunk=64)
  # The float32 logits themselves carry an error of about eps * 500 per entry.
  np.testing.assert_allclose(ent, ent_ref, atol=2e-4)
  np.testing.assert_allclose(lp, lp_ref, atol=2e-4)
  assert lp[0] <= 0


def test_all_masked_and_empty_batches():
  p = problem(17, lead=(2, 3), mask=False)
  h, w = jnp.asarray(p["h"], jnp.float32), jnp.asarray(p["w"], jnp.float32)
  y = jnp.asarray(p["y"])
  none = jnp.zeros((2, 3), bool)
  lp, ent = covrl.token_log_probs_and_entropy(h, w, y, mask=none)
  assert np.all(lp == 0) and np.all(ent == 0)
  g = jax.grad(lambda h, w: jnp.sum(covrl.token_log_probs_and_entropy(h, w, y, mask=none)[1]),
               (0, 1))(h, w)
  assert all(np.all(x == 0) for x in g)
  lp, ent = covrl.token_log_probs_and_entropy(jnp.zeros((0, 6)), w, jnp.zeros((0,), jnp.int32))
  assert lp.shape == ent.shape == (0,)
  # One token, no leading axes.
  lp, ent = covrl.token_log_probs_and_entropy(jnp.zeros(6), w, jnp.asarray(3))
  assert lp.shape == () and abs(float(ent) - np.log(37)) < 1e-5


def test_masked_vocabulary_columns_get_no_gradient():
  p = problem(18)
  (h, w, y), kw = fused(p, jnp.float32, 1.0, vocab_chunk=5)
  dw = jax.grad(lambda w: jnp.sum(covrl.token_log_probs_and_entropy(h, w, y, **kw)[1]))(w)
  assert np.all(np.asarray(dw)[:, ~p["vm"]] == 0)
  assert np.any(np.asarray(dw)[:, p["vm"]] != 0)


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(n=st.integers(1, 9), v=st.integers(1, 20), tc=st.integers(1, 10),
                  vc=st.integers(1, 24), seed=st.integers(0, 10**6))
def test_any_chunking_gives_the_reference(n, v, tc, vc, seed):
  p = problem(seed, lead=(n,), d=3, v=v, vocab_mask=v > 1)
  with _compat.enable_x64(True):
    (h, w, y), kw = fused(p, jnp.float64, 1.1, token_chunk=tc, vocab_chunk=vc)
    lp, ent = covrl.token_log_probs_and_entropy(h, w, y, **kw)
  lp_ref, ent_ref = np_reference(p, 1.1)
  np.testing.assert_allclose(lp, lp_ref, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(ent, ent_ref, rtol=1e-12, atol=1e-12)


def test_bad_input_fails_before_tracing():
  h, w = jnp.zeros((2, 3, 4), jnp.float32), jnp.zeros((4, 10), jnp.float32)
  y = jnp.zeros((2, 3), jnp.int32)
  f = covrl.token_log_probs_and_entropy
  cases = [
      (TypeError, "hidden", lambda: f(h.astype(jnp.int32), w, y)),
      (TypeError, "kernel", lambda: f(h, w.astype(jnp.int32), y)),
      (ValueError, "kernel", lambda: f(h, jnp.zeros((5, 10)), y)),
      (ValueError, "kernel", lambda: f(h, jnp.zeros((4,)), y)),
      (TypeError, "tokens", lambda: f(h, w, y.astype(jnp.float32))),
      (ValueError, "tokens", lambda: f(h, w, y[:, :2])),
      (ValueError, "tokens", lambda: f(h, w, y.at[0, 0].set(10))),
      (ValueError, "tokens", lambda: f(h, w, y.at[0, 0].set(-1))),
      (ValueError, "bias", lambda: f(h, w, y, bias=jnp.zeros(9))),
      (TypeError, "bias", lambda: f(h, w, y, bias=jnp.zeros(10, jnp.int32))),
      (ValueError, "mask", lambda: f(h, w, y, mask=jnp.ones((2, 2)))),
      (ValueError, "mask", lambda: f(h, w, y, mask=jnp.full((2, 3), 2))),
      (TypeError, "mask", lambda: f(h, w, y, mask=jnp.ones((2, 3), jnp.complex64))),
      (ValueError, "vocab_mask", lambda: f(h, w, y, vocab_mask=jnp.ones(9, bool))),
      (ValueError, "vocab_mask", lambda: f(h, w, y, vocab_mask=jnp.zeros(10, bool))),
      (ValueError, "temperature", lambda: f(h, w, y, temperature=0.0)),
      (ValueError, "temperature", lambda: f(h, w, y, temperature=jnp.ones(2))),
      (ValueError, "token_chunk", lambda: f(h, w, y, token_chunk=0)),
      (ValueError, "token_chunk", lambda: f(h, w, y, token_chunk=2.0)),
      (ValueError, "vocab_chunk", lambda: f(h, w, y, vocab_chunk=True)),
      (ValueError, "d_hidden", lambda: covrl.token_entropy_and_change(h, w, h[:1])),
      (ValueError, "d_kernel", lambda: covrl.token_entropy_and_change(h, w, None, w[:2])),
      (ValueError, "d_bias", lambda: covrl.token_entropy_and_change(h, w, d_bias=jnp.ones(3))),
  ]
  for error, name, call in cases:
    with pytest.raises(error, match=name):
      call()
  # An out-of-range id at a masked position is padding, not an error; under jit the value
  # checks are skipped (the inputs are tracers), the shape checks still run at trace time.
  f(h, w, y.at[0, 0].set(99), mask=jnp.ones((2, 3)).at[0, 0].set(0))
  jax.jit(lambda y: f(h, w, y))(y.at[0, 0].set(99))
  with pytest.raises(ValueError, match="tokens"):
    jax.jit(lambda y: f(h, w, y[:, :1]))(y)


def test_docstring_examples_run():
  result = doctest.testmod(vocab_module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0

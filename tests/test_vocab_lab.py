"""The transformer lab's fused head (GRPOConfig.fused_head): its loss, metrics and gradient equal
the logits path's to float32 round-off, for each control family, on a real rollout batch.

The reference is the lab's own logits path (the head applied, `covrl.policy_loss` on the
logits), which tests/test_transformer_grpo.py checks against covrl's losses; here the fused path
must reproduce it, with chunks small enough that both axes have several chunks and remainders.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import covrl
from covrl.transformer import get_trainer, init_params, lab, sampling
from covrl.transformer.loss import normalize_control, policy_loss

CFG = lab.lab_config("test")  # vocabulary 8, d_model 32
F32 = np.finfo(np.float32).eps
CHUNKS = (7, 3)  # 64 rows x 3 response tokens -> 28 token chunks; V = 8 -> chunks 3, 3, 2

CONTROLS = {
    "none": covrl.NoControl(),
    "bonus": covrl.EntropyBonus(0.05),
    "clip_cov": covrl.ClipCov(clip_cov_ratio=0.05, clip_cov_lb=-10.0, clip_cov_ub=10.0),
    "kl_cov": covrl.KLCov(kl_cov_ratio=0.05, ppo_kl_coef=1.0),
}


@pytest.fixture(scope="module")
def setup():
  trainer = get_trainer(CFG)
  params = init_params(CFG.model, jax.random.key(0))
  # Scale the head up so that the policy is far from uniform (entropies and their gradients
  # are then not all alike).
  params = {**params, "head": jax.tree.map(lambda x: 40.0 * x, params["head"])}
  _, _, batch, _ = trainer.batch(params, jax.random.key(1))
  rows = jnp.arange(CFG.minibatch_size)  # one mini-batch, as the update sees it
  batch = jax.tree.map(lambda x: x[rows], batch)
  # Off-policy old log-probs, so that clipping and the covariance selections are non-trivial.
  batch = batch._replace(old_log_probs=batch.old_log_probs + 0.3 * jax.random.normal(
      jax.random.key(2), batch.old_log_probs.shape))
  return trainer, params, batch


def _loss_and_grad(cfg, model, params, batch, control):
  fn = jax.jit(jax.value_and_grad(
      lambda p: policy_loss(cfg, model, p, batch, jax.random.key(3), control, 5), has_aux=True))
  (loss, (metrics, selected)), grads = fn(params)
  return loss, metrics, selected, grads


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_fused_head_equals_the_logits_path(setup, name):
  trainer, params, batch = setup
  assert float(jnp.mean(batch.response_mask)) < 1.0  # some padding after EOS is exercised
  base = dataclasses.replace(CFG, control=CONTROLS[name])
  control = normalize_control(base.control, base.ratio_bound)
  ref = _loss_and_grad(base, trainer.model, params, batch, control)
  fused_cfg = dataclasses.replace(base, fused_head=True, fused_chunks=CHUNKS)
  out = _loss_and_grad(fused_cfg, trainer.model, params, batch, control)

  loss_r, metrics_r, selected_r, grads_r = ref
  loss_f, metrics_f, selected_f, grads_f = out
  np.testing.assert_array_equal(selected_f, selected_r)
  # loss_entropy_change needs the logits (vocabulary-sized sums per token): the logits path only.
  assert sorted(metrics_f) == sorted(set(metrics_r) - {"loss_entropy_change"})
  for k in metrics_f:
    r = np.asarray(metrics_r[k], np.float64)
    np.testing.assert_allclose(metrics_f[k], r, atol=64 * F32 * max(np.max(np.abs(r)), 1.0),
                               err_msg=k)
  np.testing.assert_allclose(loss_f, loss_r, atol=64 * F32 * max(abs(float(loss_r)), 1.0))
  flat_r, flat_f = jax.tree.leaves_with_path(grads_r), jax.tree.leaves(grads_f)
  for (path, r), f in zip(flat_r, flat_f):
    r = np.asarray(r, np.float64)
    scale = max(np.max(np.abs(r)), 1e-6)
    np.testing.assert_allclose(np.asarray(f, np.float64), r, atol=256 * F32 * scale,
                               err_msg=jax.tree_util.keystr(path))
  if name == "bonus":  # the bonus reached the fused path's gradient: not the no-bonus one
    plain = _loss_and_grad(dataclasses.replace(fused_cfg, control=CONTROLS["none"]),
                           trainer.model, params, batch,
                           normalize_control(CONTROLS["none"], base.ratio_bound))
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(grads_f), jax.tree.leaves(plain[3])))
    assert gap > 1e3 * F32


def _shapes(jaxpr) -> set[tuple[int, ...]]:
  """Shapes of every value a jaxpr computes, its sub-jaxprs (scans, custom VJPs) included."""
  out = set()
  for eqn in jaxpr.eqns:
    out.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
    for p in eqn.params.values():
      for j in (p if isinstance(p, tuple | list) else (p,)):
        inner = getattr(j, "jaxpr", j)
        if hasattr(inner, "eqns"):
          out |= _shapes(inner)
  return out


def test_fused_head_never_forms_the_logits(setup):
  """The fused loss's gradient program holds no [rows, R, V] array; the logits path's does."""
  trainer, params, batch = setup
  control = normalize_control(CONTROLS["bonus"], CFG.ratio_bound)
  full = (*batch.response_mask.shape, CFG.model.vocab_size)
  for fused, expect in ((False, True), (True, False)):
    cfg = dataclasses.replace(CFG, control=CONTROLS["bonus"], fused_head=fused,
                              fused_chunks=CHUNKS)
    grad = jax.grad(lambda p, cfg=cfg: policy_loss(cfg, trainer.model, p, batch,
                                                   jax.random.key(3), control, 5)[0])
    assert (full in _shapes(jax.make_jaxpr(grad)(params).jaxpr)) == expect


def test_hidden_states_and_head_give_the_logits(setup):
  trainer, params, batch = setup
  hidden = sampling.response_hidden(trainer.model, params, batch.prompts, batch.responses)
  logits = sampling.response_logits(trainer.model, params, batch.prompts, batch.responses, 1.0)
  head = params["head"]
  np.testing.assert_allclose(hidden @ head["kernel"] + head["bias"], logits,
                             atol=16 * F32 * float(jnp.max(jnp.abs(logits))))


def test_bad_fused_chunks_fail_in_the_config():
  with pytest.raises(ValueError, match="token_chunk"):
    dataclasses.replace(CFG, fused_chunks=(0, 8))
  with pytest.raises(ValueError, match=r"\(token_chunk, vocab_chunk\)"):
    dataclasses.replace(CFG, fused_chunks=(8,))
  with pytest.raises(TypeError, match="fused_head"):
    dataclasses.replace(CFG, fused_head=1)

"""The GRPO loop: determinism, losses per method, checkpoints, devices, hosts, bad configs."""

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import covrl
from benchmarks.transformer import benchmark_hook
from covrl import schedules
from covrl.transformer import (
  GRPOConfig,
  ModelConfig,
  SFTConfig,
  get_trainer,
  grpo,
  init_params,
  lab,
  make_train,
  run_training,
  runner,
  sampling,
  tasks,
)
from covrl.transformer.loss import normalize_control, policy_loss

CFG = lab.lab_config("test")  # the claims' test size: its compiled programs are shared


@pytest.fixture(scope="module")
def trainer():
  return get_trainer(CFG)


@pytest.fixture(scope="module")
def warm(trainer):
  return trainer.warm_start(jax.random.key(0))


def _leaves_equal(a, b) -> bool:
  return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
def test_same_key_same_result_and_keys_matter(warm):
  control = covrl.KLCov(kl_cov_ratio=0.05, ppo_kl_coef=1.0)
  trainer = get_trainer(dataclasses.replace(CFG, control=control))  # KL-Cov's program

  def two_steps(key):
    state = trainer.init(key, warm, control=control)
    for _ in range(2):
      state, metrics, aux = trainer.step(state)
    return state, metrics, aux

  a, b, c = two_steps(jax.random.key(1)), two_steps(jax.random.key(1)), two_steps(
      jax.random.key(2))
  assert _leaves_equal(a, b)
  assert not np.array_equal(a[2].rollout.responses, c[2].rollout.responses)
  assert int(a[0].step) == 2
  assert float(a[1]["selected_frac"]) > 0


def test_policy_loss_is_covrls_loss_for_each_method(trainer, warm):
  """The switch over methods computes exactly the covrl loss each method names."""
  cfg = trainer.config
  _, _, batch, _ = trainer.batch(warm, jax.random.key(3))
  key = jax.random.key(4)
  # An off-policy batch: old log-probs moved, so ratios and clipping are non-trivial.
  batch = batch._replace(old_log_probs=batch.old_log_probs + 0.3 * jax.random.normal(
      jax.random.key(5), batch.old_log_probs.shape))
  loss_fn = jax.jit(lambda control, step: policy_loss(
      cfg, trainer.model, warm, batch, key, control, step))
  raw = jax.jit(sampling.response_logits, static_argnums=0)(
      trainer.model, warm, batch.prompts, batch.responses)
  logits = raw / cfg.temperature
  logp = sampling.token_log_probs(logits, batch.responses)
  args = (batch.old_log_probs, logp, batch.advantages, batch.response_mask)
  step = 7
  anneal = schedules.inverse_time(0.5, 2.0)

  @jax.jit
  def references(args, raw, key):
    return {
        "none": covrl.ppo_loss(*args, clip_ratio_c=3.0)[0],
        "clip_higher": covrl.ppo_loss(*args, clip_ratio_low=0.2, clip_ratio_high=0.28,
                                      clip_ratio_c=3.0)[0],
        "entropy": covrl.ppo_loss(*args, clip_ratio_c=3.0)[0] + covrl.entropy_bonus_loss(
            raw, args[3], coef=anneal, step=step, temperature=cfg.temperature)[0],
        "kl_cov": covrl.kl_cov_loss(*args, kl_cov_ratio=0.05, ppo_kl_coef=anneal(step))[0],
        "clip_cov": covrl.clip_cov_loss(*args, key=key, clip_cov_ratio=0.05, clip_cov_lb=0.0,
                                        clip_cov_ub=5.0)[0],
    }

  want = references(args, raw, key)
  controls = {"none": covrl.NoControl(),
              "clip_higher": covrl.ClipHigher(clip_ratio_low=0.2, clip_ratio_high=0.28),
              "entropy": covrl.EntropyBonus(anneal),
              "kl_cov": covrl.KLCov(kl_cov_ratio=0.05, ppo_kl_coef=anneal),
              "clip_cov": covrl.ClipCov(clip_cov_ratio=0.05, clip_cov_lb=0.0, clip_cov_ub=5.0)}
  for name, control in controls.items():
    loss, (metrics, selected) = loss_fn(normalize_control(control, cfg.ratio_bound), step)
    np.testing.assert_allclose(loss, want[name], rtol=1e-5, err_msg=name)
    if name in ("kl_cov", "clip_cov"):
      assert 0 < float(metrics["selected_frac"]) <= 0.05 + 1.0 / batch.responses.size
      assert int(selected.sum()) > 0
    else:
      assert not bool(selected.any())
  # The entropy metric is the full-vocabulary entropy of the tempered logits.
  z = np.asarray(logits, np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  h = -np.sum(p * np.log(p), -1)
  mask = np.asarray(batch.response_mask)
  np.testing.assert_allclose(metrics["entropy"], h[mask].mean(), rtol=1e-5)


class _Interrupted:
  """A Trainer that raises KeyboardInterrupt (Ctrl-C) on its n-th chunk."""

  def __init__(self, trainer, at):
    self.trainer, self.config, self.at, self.calls = trainer, trainer.config, at, 0

  def init(self, *args, **kwargs):
    return self.trainer.init(*args, **kwargs)

  def run(self, state, num_steps):
    self.calls += 1
    if self.calls == self.at:
      raise KeyboardInterrupt
    return self.trainer.run(state, num_steps)


@pytest.mark.slow
def test_resume_after_interrupt_equals_uninterrupted_run(trainer, warm, tmp_path):
  key = jax.random.key(5)
  reference, ref_metrics = make_train(CFG)(key, warm)  # one compiled scan over all steps
  assert int(reference.step) == CFG.num_steps
  for name in ("reward", "entropy", "selected_frac", "clip_frac", "touched_frac", "approx_kl",
               "entropy_change", "entropy_change_predicted", "old_log_prob_roundoff"):
    assert ref_metrics[name].shape == (CFG.num_steps,), name
    assert np.all(np.isfinite(ref_metrics[name])), name
  assert np.all((ref_metrics["reward"] >= 0) & (ref_metrics["reward"] <= 1))
  chunk = CFG.num_steps // 2
  with pytest.raises(KeyboardInterrupt):
    run_training(CFG, key, params=warm, chunk_steps=chunk, checkpoint_dir=tmp_path,
                 progress=False, trainer=_Interrupted(trainer, at=2))
  assert [p.name for p in tmp_path.iterdir()] == [f"step_{chunk:08d}"]
  state, metrics = run_training(CFG, key, params=warm, chunk_steps=chunk,
                                checkpoint_dir=tmp_path, progress=False)
  assert _leaves_equal(state, reference)
  for name, values in ref_metrics.items():
    np.testing.assert_array_equal(metrics[name], np.asarray(values), err_msg=name)
  # Resuming a finished run recomputes nothing and returns the same result.
  again, metrics_again = run_training(CFG, key, params=warm, chunk_steps=chunk,
                                      checkpoint_dir=tmp_path, progress=False,
                                      trainer=_Interrupted(trainer, at=1))
  assert _leaves_equal(again, reference)
  np.testing.assert_array_equal(metrics_again["entropy"], np.asarray(ref_metrics["entropy"]))


def test_failed_save_leaves_the_last_good_checkpoint(trainer, warm, tmp_path, monkeypatch):
  key = jax.random.key(6)
  chunk = CFG.num_steps // 2
  save = np.savez
  calls = []

  def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise OSError("disk full")
    return save(*args, **kwargs)

  monkeypatch.setattr(runner.np, "savez", failing)
  with pytest.raises(OSError, match="disk full"):
    run_training(CFG, key, params=warm, chunk_steps=chunk, checkpoint_dir=tmp_path,
                 progress=False)
  monkeypatch.setattr(runner.np, "savez", save)
  names = sorted(p.name for p in tmp_path.iterdir())
  assert f"step_{chunk:08d}" in names and f"step_{2 * chunk:08d}" not in names
  like = trainer.init(key, warm)
  fingerprint = runner._fingerprint(CFG, CFG.control, key, False)
  state, metrics = runner.load_checkpoint(tmp_path, like, fingerprint)
  assert int(state.step) == chunk and metrics["reward"].shape == (chunk,)
  assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())  # stale temp removed


def test_checkpoint_of_another_run_is_refused(warm, tmp_path):
  run_training(CFG, jax.random.key(7), params=warm, chunk_steps=CFG.num_steps,
               checkpoint_dir=tmp_path, progress=False)
  with pytest.raises(ValueError, match="different run"):
    run_training(CFG, jax.random.key(8), params=warm, chunk_steps=CFG.num_steps,
                 checkpoint_dir=tmp_path, progress=False)


@pytest.mark.slow
def test_one_and_eight_devices_agree(warm):
  assert len(jax.devices()) == 8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  for control in (covrl.KLCov(kl_cov_ratio=0.05, ppo_kl_coef=1.0),
                  covrl.ClipCov(clip_cov_ratio=0.05, clip_cov_lb=0.0, clip_cov_ub=5.0)):
    config = dataclasses.replace(CFG, control=control)  # one program per control family
    trainer, sharded = get_trainer(config), get_trainer(config, mesh)
    one = trainer.init(jax.random.key(9), warm, control=control)
    eight = sharded.init(jax.random.key(9), warm, control=control)
    for _ in range(2):
      one, m1, aux1 = trainer.step(one)
      eight, m8, aux8 = sharded.step(eight)
      # Same tokens sampled, same tokens selected, same rewards: exactly.
      np.testing.assert_array_equal(aux1.rollout.responses, aux8.rollout.responses)
      np.testing.assert_array_equal(aux1.selected, aux8.selected)
      np.testing.assert_array_equal(aux1.rewards, aux8.rewards)
      assert int(aux1.selected.sum()) > 0
      for name in ("loss", "entropy", "approx_kl", "grad_norm", "cov_mean"):
        np.testing.assert_allclose(m8[name], m1[name], rtol=2e-5, atol=1e-6, err_msg=name)
    assert len(eight.params["head"]["kernel"].sharding.device_set) == 8
    # Parameters: the update of each leaf agrees to 1e-3 of its size. Adam divides by |g|, so
    # entries whose gradient is round-off-sized move by ~lr in either run; exact agreement of
    # the update is not expected, agreement of its bulk is.
    for p1, p8, p0 in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params),
                          jax.tree.leaves(warm)):
      update = float(jnp.linalg.norm(p1 - p0))
      assert float(jnp.linalg.norm(p8 - p1)) <= 1e-3 * update + 1e-7


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_get_the_single_process_result(trainer, tmp_path):
  worker = Path(__file__).with_name("_transformer_multihost_worker.py")
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, str(worker), str(port), str(i),
                             str(tmp_path / f"out{i}.npz")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT) for i in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out.decode()[-3000:]
  # The single-process run of the same config, key and initial parameters.
  state = trainer.init(jax.random.key(0), init_params(CFG.model, jax.random.key(1)))
  responses, rewards = [], []
  for _ in range(2):
    state, metrics, aux = trainer.step(state)
    responses.append(np.asarray(aux.rollout.responses))
    rewards.append(float(metrics["reward"]))
  want = {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
  for i in range(2):
    got = np.load(tmp_path / f"out{i}.npz")
    np.testing.assert_array_equal(got["responses"], np.stack(responses))
    np.testing.assert_array_equal(got["rewards"], rewards)
    for name, value in want.items():
      np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


TASK = tasks.Sort(6, 3)


@pytest.mark.parametrize("make, error, match", [
    (lambda: GRPOConfig(TASK, ModelConfig(5, 7)), ValueError, "vocab_size"),
    (lambda: GRPOConfig(TASK, ModelConfig(8, 6)), ValueError, "context_length"),
    (lambda: GRPOConfig(TASK, group_size=1), ValueError, "group_size"),
    (lambda: GRPOConfig(TASK, num_minibatches=3), ValueError, "must divide the batch"),
    (lambda: GRPOConfig(TASK, temperature=0.0), ValueError, "temperature"),
    (lambda: GRPOConfig(TASK, learning_rate=-1e-3), ValueError, "learning_rate"),
    (lambda: GRPOConfig(TASK, loss_agg_mode="mean"), ValueError, "loss_agg_mode"),
    (lambda: GRPOConfig(TASK, control=covrl.NoControl(clip_ratio_c=1.0)), ValueError,
     "dual clip"),
    (lambda: GRPOConfig(TASK, control=covrl.KLCov(kl_cov_ratio=0.1), token_ratio_bound=0.05),
     ValueError,
     "exceeds token_ratio_bound"),
    (lambda: GRPOConfig(TASK, num_steps=2.5), ValueError, "num_steps"),
    (lambda: GRPOConfig("sort"), TypeError, "task"),
    (lambda: GRPOConfig(TASK, control="kl_cov"), TypeError, "control"),
    (lambda: GRPOConfig(TASK, sft=SFTConfig(noise=1.0)), ValueError, "noise"),
    (lambda: covrl.method("entropy_bonus"), ValueError, "unknown method"),
    (lambda: covrl.NoControl(entropy_coeff=0.1), TypeError, "entropy_coeff"),
    (lambda: covrl.EntropyBonus(0.1, kl_cov_ratio=0.1), TypeError, "kl_cov_ratio"),
    (lambda: covrl.ClipHigher(clip_ratio_low=0.2, clip_ratio_high=0.2), ValueError,
     "clip_ratio_high > clip_ratio_low"),
    (lambda: covrl.ClipCov(clip_cov_ratio=2e-4, clip_cov_lb=5.0, clip_cov_ub=1.0), ValueError,
     "lb < ub"),
    (lambda: covrl.KLCov(kl_cov_ratio=1.5), ValueError, "fraction"),
    (lambda: covrl.EntropyBonus(-1.0), ValueError, "coef"),
    (lambda: get_trainer(CFG).init(jax.random.key(0), control=covrl.EntropyBonus(
        optax.linear_schedule(0.1, 0.0, 10))), TypeError, "PowerDecay"),
])
def test_bad_configs_fail_before_compilation(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_bad_runs_fail_before_compilation(trainer, tmp_path):
  with pytest.raises(ValueError, match="token_ratio_bound"):
    trainer.init(jax.random.key(0), control=covrl.KLCov(kl_cov_ratio=0.5))
  # One compiled program per control family: another family needs its own Trainer.
  with pytest.raises(ValueError, match="another"):
    trainer.init(jax.random.key(0), control=covrl.KLCov(kl_cov_ratio=0.05))
  with pytest.raises(ValueError, match="chunk_steps"):
    run_training(CFG, jax.random.key(0), chunk_steps=7, progress=False)
  mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
  with pytest.raises(ValueError, match="'data' axis"):
    grpo.Trainer(CFG, mesh)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  with pytest.raises(ValueError, match="split evenly"):
    grpo.Trainer(dataclasses.replace(CFG, prompts_per_step=1, group_size=4, num_minibatches=1),
                 mesh)


def test_a_control_family_shares_one_compiled_program(trainer, warm):
  """A control's numbers are traced leaves: constant and annealed coefficients, and any strength
  or ratio, have one pytree structure (one compiled program); options make another."""
  methods = lab.lab_methods(CFG.num_steps)
  assert [m.label for m in methods] == ["none", "entropy", "entropy_annealed", "clip_higher",
                                        "clip_cov", "kl_cov", "kl_cov_annealed"]
  assert len({jax.tree.structure(normalize_control(m, CFG.ratio_bound)) for m in methods}) == 5
  bonus = get_trainer(dataclasses.replace(CFG, control=methods[1]))
  assert bonus.in_family(methods[2]) and bonus.in_family(covrl.EntropyBonus(0.5))
  assert not bonus.in_family(covrl.NoControl())
  kl = get_trainer(dataclasses.replace(CFG, control=methods[5]))
  assert kl.in_family(methods[6]) and kl.in_family(covrl.KLCov(kl_cov_ratio=0.01,
                                                                ppo_kl_coef=0.3))
  assert not kl.in_family(covrl.KLCov(kl_cov_ratio=0.01, selection="local"))
  # Traced strengths: the loss vmapped over two bonus coefficients is the loss of each.
  _, _, batch, _ = trainer.batch(warm, jax.random.key(3))
  form = normalize_control(methods[1], CFG.ratio_bound)
  coefs = jnp.asarray([0.0, 0.3], jnp.float32)
  loss = jax.jit(lambda c: policy_loss(CFG, trainer.model, warm, batch, jax.random.key(4), c,
                                       0)[0])
  strength = lambda c: form.with_strength(schedules.PowerDecay(c, form.entropy_coeff.power,
                                                               form.entropy_coeff.offset))
  both = jax.vmap(lambda c: loss(strength(c)))(coefs)
  for i in range(2):
    np.testing.assert_allclose(both[i], loss(strength(coefs[i])), rtol=1e-6)
  assert float(both[0]) != float(both[1])


def test_benchmark_hook_contract():
  parts = benchmark_hook("small", jax.random.key(0))
  assert parts["rollout_tokens"] == CFG.batch_size * CFG.task.response_length
  assert parts["update_tokens"] == CFG.batch_size * (CFG.task.context_length - 1)
  rollout, rewards = parts["rollout"]()
  assert rewards.shape == (CFG.batch_size,)
  assert rollout.responses.shape == (CFG.batch_size, CFG.task.response_length)
  assert "1 layer," in parts["description"]
  with pytest.raises(ValueError, match="size"):
    benchmark_hook("huge", jax.random.key(0))

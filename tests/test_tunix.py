"""covrl's control values inside tunix's GRPO learner, on tunix's toy model and vocabulary (CPU).

Needs `pip install -e ".[tunix,test]"` (skipped without tunix). Each run trains a few GRPO steps
of `tunix.tests.test_common.ToyTransformer` with a covrl control value registered in tunix,
records what the trainer was given and the parameters before each call, and checks against
`covrl.policy_loss` called directly on the same batch with the same parameters: the loss tunix
logs, and, under gradient accumulation, the selection, the logged metrics and the parameter
update of one loss over the whole optimizer mini-batch.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tunix", reason="needs the covrl[tunix] extra")

import optax
from flax import nnx
from tunix.rl import common
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner as grpo_lib
from tunix.rl.rollout import base_rollout
from tunix.tests import test_common as tc

import covrl
from covrl.integrations import tunix as ct

LR = 1e-2
SEED = 0
PROMPTS = [["hello world", "My name"], ["input string", "hello there"]]


def reward(prompts, completions, **kwargs):
  del prompts, kwargs
  return [len(c) / 10.0 for c in completions]  # varied completions give non-zero advantages


def run_grpo(control, *, grad_acc=1, selection="global", beta=0.0, steps=2, num_iterations=2,
             install=True, loss_agg_mode="token-mean"):
  """Train `steps` global steps; returns (trainer, records, final params).

  records[i] = (examples the trainer got in call i, Param state before it, graphdef, rest).
  """
  vocab = tc.MockVocab()
  config = tc.ModelConfig(vocab_size=vocab.GetPieceSize())
  model = tc.ToyTransformer(config=config, rngs=nnx.Rngs(0))
  reference = tc.ToyTransformer(config=config, rngs=nnx.Rngs(0)) if beta else None
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
  roles = [rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.ROLLOUT, rl_cluster_lib.Role.REFERENCE]
  cluster = rl_cluster_lib.RLCluster(
      actor=model, reference=reference, tokenizer=vocab,
      cluster_config=rl_cluster_lib.ClusterConfig(
          role_to_mesh=dict.fromkeys(roles, mesh), rollout_engine="vanilla",
          offload_to_cpu=False,
          training_config=rl_cluster_lib.RLTrainingConfig(
              actor_optimizer=optax.sgd(LR), eval_every_n_steps=1000, max_steps=steps,
              mini_batch_size=2 if grad_acc > 1 else None,
              train_micro_batch_size=2 // grad_acc if grad_acc > 1 else None),
          # temperature 1: tunix 0.1.7 computes old log-probs without the sampling temperature
          rollout_config=base_rollout.RolloutConfig(
              max_tokens_to_generate=8, max_prompt_length=16, kv_cache_size=64,
              temperature=1.0)))
  name = ct.register(control, name=f"test_{control.name}", seed=SEED)
  algo = grpo_lib.GRPOConfig(num_generations=4, num_iterations=num_iterations, beta=beta,
                             policy_loss_fn=name, loss_agg_mode=loss_agg_mode)
  learner = grpo_lib.GRPOLearner(rl_cluster=cluster, algo_config=algo, reward_fns=reward)

  trainer, records, inner = cluster.actor_trainer, [], cluster.actor_trainer.train

  def capture(train_ds, eval_ds=None, skip_jit=False):
    graphdef, params, rest = nnx.split(trainer.model, nnx.Param, ...)
    records.append((list(train_ds), jax.tree.map(jnp.copy, params), graphdef, rest))
    return inner(train_ds, eval_ds, skip_jit)

  trainer.train = capture  # install() wraps it: we see what the trainer is given
  if install:
    ct.install(learner, selection=selection)
  learner.train([{"prompts": np.array(p)} for p in PROMPTS] * steps)
  return trainer, records, nnx.state(trainer.model, nnx.Param)


def logged(trainer, metric):
  return np.asarray(trainer.metrics_logger.get_metric_history(trainer.metrics_prefix, metric,
                                                              "train"))


def concat(examples):
  fields = ("prompt_ids", "completion_ids", "completion_mask", "advantages",
            "old_per_token_logps", "ref_per_token_logps")
  return {f: None if getattr(examples[0], f) is None
          else jnp.concatenate([getattr(e, f) for e in examples]) for f in fields}


def log_probs(params, graphdef, rest, batch):
  g, state = nnx.split(nnx.merge(graphdef, params, rest))
  return common.compute_per_token_logps(
      g, state, prompt_tokens=batch["prompt_ids"], completion_tokens=batch["completion_ids"],
      pad_id=0, eos_id=2, stop_gradient=False, return_logits=True)


def inputs(batch, log_prob):
  mask = batch["completion_mask"]
  adv = jnp.broadcast_to(batch["advantages"][:, None], mask.shape)
  old = batch["old_per_token_logps"]
  return (jax.lax.stop_gradient(log_prob) if old is None else old), log_prob, adv, mask


def step_key(step):
  """The documented key of a random selection at optimizer step `step` (micro-batch 0)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(SEED), step), 0)


def direct_loss(control, params, graphdef, rest, batch, *, key=None, step=None, beta=0.0,
                mode="token-mean"):
  """covrl.policy_loss called directly (one call, the whole batch), plus GRPO's beta KL term."""
  log_prob, logits = log_probs(params, graphdef, rest, batch)
  old, new, adv, mask = inputs(batch, log_prob)
  value, metrics = covrl.policy_loss(control, old, new, adv, mask, key=key, step=step,
                                     logits=logits, loss_agg_mode=mode)
  if beta:
    kl = new - batch["ref_per_token_logps"]  # GRPOConfig's default kl_loss_mode "kl"
    value = value + beta * covrl.aggregate(kl, mask, mode).value
  return value, metrics


# A wide band and large ratios, so that the toy batch has tokens to select.
CONTROLS = {
    "none": covrl.NoControl(),
    "entropy": covrl.EntropyBonus(0.01, clip_ratio_low=0.2, clip_ratio_high=0.28),
    "clip_higher": covrl.ClipHigher(),
    "clip_cov": covrl.ClipCov(clip_cov_ratio=0.1, clip_cov_lb=0.0, clip_cov_ub=100.0),
    "kl_cov": covrl.KLCov(kl_cov_ratio=0.05, ppo_kl_coef=1.0),
    # The new methods (issue 12): the adaptive bonus at its current coefficient (its controller
    # updates the coefficient between steps, outside the loss), and the entropy readers, which
    # take the entropy from the logits tunix's loss computes.
    "adaptive_entropy": covrl.AdaptiveEntropyBonus(entropy_coeff=0.005),
    "forking_tokens": covrl.ForkingTokens(),
    "entropy_advantage": covrl.EntropyAdvantage(),
    "w_reinforce": covrl.WReinforce(),
    "steer": covrl.STEER(),
}


def test_every_registered_method_is_tested():
  assert sorted(CONTROLS) == sorted(covrl.METHODS)
  assert all(type(c) is covrl.METHODS[name] for name, c in CONTROLS.items())


def key_of(control, example):
  return step_key(example.covrl.step) if control.needs_key else None


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(CONTROLS))
def test_logged_loss_is_covrls_loss_on_the_same_batch(method):
  control = CONTROLS[method]
  beta = 0.04 if method == "entropy" else 0.0  # GRPO's reference KL term too
  trainer, records, final = run_grpo(control, beta=beta)
  expected = [
      direct_loss(control, params, graphdef, rest, concat(examples), beta=beta,
                  key=key_of(control, examples[0]))[0]
      for examples, params, graphdef, rest in records
  ]
  np.testing.assert_allclose(logged(trainer, "loss"), np.asarray(expected), rtol=1e-5,
                             atol=1e-6)
  # The second pass over a batch is off-policy, so the controls had something to act on.
  assert np.any(np.abs(logged(trainer, "covrl/approx_kl")) > 1e-4)
  if control.selects_tokens:
    assert np.all(logged(trainer, "covrl/selected_frac") > 0)
  first = records[0][1]
  assert any(np.any(np.asarray(a) != np.asarray(b))
             for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(final)))


def groups(records, k):
  return [records[i:i + k] for i in range(0, len(records), k)]


def numpy_top_k(cov, mask, ratio):
  """KL-Cov's selection in NumPy: the max(int(ratio * N), 1) largest c_i, ties to the lower
  flat index."""
  cov, mask = np.asarray(cov, np.float64).ravel(), np.asarray(mask, bool).ravel()
  count = max(int(ratio * mask.sum()), 1)
  order = [i for i in np.argsort(-cov, kind="stable") if mask[i]][:count]
  out = np.zeros(cov.shape, bool)
  out[order] = True
  return out.reshape(-1)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(CONTROLS))
def test_global_selection_under_accumulation_is_the_one_batch_step(method):
  if method == "steer":
    pytest.skip("STEER's token weights scale by the largest |Omega| of each loss call: under "
                "tunix's accumulation, of each micro-batch (the tunix guide: not yet)")
  check_one_batch_step(method, "token-mean", "token-mean")


@pytest.mark.slow
@pytest.mark.parametrize("tunix_mode,mode", [("sequence-mean-token-mean", "seq-mean-token-mean"),
                                             ("sequence-mean-token-scale",
                                              "seq-mean-token-sum-norm")])
def test_tunix_aggregation_modes_under_accumulation(tunix_mode, mode):
  """GRPOConfig's default mode and DrGRPOConfig's, as covrl's modes over the whole mini-batch
  (the denominator: its non-empty rows)."""
  check_one_batch_step("clip_cov", tunix_mode, mode)


@pytest.mark.parametrize("tunix_mode", sorted(ct.TUNIX_LOSS_AGG_MODES))
def test_aggregation_names_match_tunix(tunix_mode):
  """Each tunix name maps to the covrl mode of the same value (tunix's own aggregate_loss)."""
  rng = np.random.default_rng(0)
  loss = rng.normal(size=(5, 7)).astype(np.float32)
  mask = (rng.uniform(size=(5, 7)) < 0.6).astype(np.float32)
  mask[2] = 0.0  # an empty row: the sequence modes count non-empty rows
  want = common.aggregate_loss(jnp.asarray(loss), jnp.asarray(mask), tunix_mode)
  got = covrl.aggregate(loss, mask, ct.TUNIX_LOSS_AGG_MODES[tunix_mode]).value
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def check_one_batch_step(method, tunix_mode, mode):
  control, k = CONTROLS[method], 2
  trainer, records, final = run_grpo(control, grad_acc=k, selection="global",
                                     loss_agg_mode=tunix_mode)
  losses = logged(trainer, "loss")
  assert len(records) == k * len(losses)
  params_after = [group[0][1] for group in groups(records, k)[1:]] + [final]
  for g, group in enumerate(groups(records, k)):
    examples = [ex for exs, *_ in group for ex in exs]
    _, params, graphdef, rest = group[0]
    # Accumulation leaves the parameters alone until the k-th micro-batch.
    for _, p, *_ in group[1:]:
      jax.tree.map(np.testing.assert_array_equal, params, p)
    batch = concat(examples)
    old, new, adv, mask = inputs(batch, log_probs(params, graphdef, rest, batch)[0])
    cov = covrl.token_covariance(new, adv, mask)
    step = int(examples[0].covrl.step)
    assert step == g and all(int(ex.covrl.step) == g for ex in examples)
    if not control.selects_tokens:  # nothing to select: the mini-batch's denominator does it
      want = None
    elif method == "kl_cov":
      want = numpy_top_k(cov, mask, control.kl_cov_ratio).reshape(mask.shape)
    elif method == "forking_tokens":  # the one-batch selection on the mini-batch's entropies
      # (covrl's quantile rule, TRL's bit for bit: tests/test_trl_parity.py)
      entropy = covrl.entropy(log_probs(params, graphdef, rest, batch)[1])
      tokens = covrl.tokens.with_entropy(covrl.policy_tokens(old, new, adv, mask),
                                         entropy=entropy)
      want = covrl.select_tokens(control, tokens, control.surrogate(tokens))[1].mask
    else:  # candidates exclude PPO-clipped tokens (NumPy, float64)
      r = np.exp(np.asarray(new, np.float64) - np.asarray(old, np.float64))
      a = np.asarray(adv, np.float64)
      clipped = -a * np.clip(r, 0.8, 1.2) > -a * r
      want = covrl.clip_cov_select(
          cov, mask, key=step_key(step), ratio=control.clip_cov_ratio, lb=0.0, ub=100.0,
          eligible=~clipped).mask
    if want is not None:
      got = jnp.concatenate([ex.covrl.selected for ex in examples])
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
      assert int(np.sum(want)) >= 1

    one_batch = functools.partial(direct_loss, control, graphdef=graphdef, rest=rest,
                                  batch=batch, key=step_key(step), mode=mode)
    (value, metrics), grad = jax.value_and_grad(one_batch, has_aux=True)(params)
    np.testing.assert_allclose(losses[g], float(value), rtol=1e-5, atol=1e-6)
    # The logged metrics are the mini-batch's: fractions and means over all its valid tokens.
    names = ["approx_kl", "clip_frac", "selected_frac", "touched_frac", "entropy"]
    if control.selects_tokens:
      names += ["cov_mean", "cov_max"]
    for name in names:
      np.testing.assert_allclose(logged(trainer, f"covrl/{name}")[g], float(metrics[name]),
                                 rtol=1e-5, atol=1e-7, err_msg=name)
    # sgd: the accumulated update is -LR times the gradient of one loss over the mini-batch.
    flat = lambda tree: np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])
    after, before, want_update = flat(params_after[g]), flat(params), -LR * flat(grad)
    assert np.any(after != before)
    # float32 throughout: the parameters store the update rounded to their own spacing (two of
    # it allowed), and a component that sums micro-batch terms of opposite sign carries their
    # rounding (1e-5 of the largest component, ~100 float32 eps).
    tol = (1e-4 * np.abs(want_update) + 1e-5 * np.max(np.abs(want_update))
           + 2 * np.spacing(np.abs(after)))
    np.testing.assert_array_less(np.abs((after - before) - want_update), tol)


@pytest.mark.slow
def test_local_selection_is_per_micro_batch():
  """selection="local": each micro-batch selects and normalises on its own (verl's behaviour)."""
  control, k = CONTROLS["kl_cov"], 2
  trainer, records, _ = run_grpo(control, grad_acc=k, selection="local")
  losses = logged(trainer, "loss")
  global_losses = []
  for g, group in enumerate(groups(records, k)):
    _, params, graphdef, rest = group[0]
    per_micro = [direct_loss(control, params, graphdef, rest, concat(exs))[0]
                 for exs, *_ in group]
    np.testing.assert_allclose(losses[g], np.mean(per_micro), rtol=1e-5, atol=1e-6)
    assert [int(ex.covrl.micro_batch) for exs, *_ in group for ex in exs] == list(range(k))
    batch = concat([ex for exs, *_ in group for ex in exs])
    global_losses.append(float(direct_loss(control, params, graphdef, rest, batch)[0]))
  # Off-policy steps (the second pass) differ from the one-batch loss.
  assert np.max(np.abs(losses - np.asarray(global_losses))) > 1e-6


@pytest.mark.slow
def test_a_scheduled_strength_gets_the_optimizer_step():
  """A PowerDecay coefficient is evaluated at tunix's optimizer step, which install passes."""
  control = covrl.KLCov(kl_cov_ratio=0.05, ppo_kl_coef=covrl.schedules.inverse_time(2.0))
  trainer, records, _ = run_grpo(control, steps=2)
  steps = [int(exs[0].covrl.step) for exs, *_ in records]
  assert steps == list(range(len(records)))
  expected = [direct_loss(control, p, g, rest, concat(exs), step=s)[0]
              for (exs, p, g, rest), s in zip(records, steps)]
  np.testing.assert_allclose(logged(trainer, "loss"), np.asarray(expected), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.slow
def test_register_alone_runs_tunix_per_micro_batch():
  """Without install: tunix's own metrics and per-call losses; a schedule asks for install."""
  control = CONTROLS["kl_cov"]
  trainer, records, _ = run_grpo(control, install=False)
  assert not hasattr(records[0][0][0], "covrl")
  expected = [direct_loss(control, p, g, rest, concat(exs))[0] for exs, p, g, rest in records]
  np.testing.assert_allclose(logged(trainer, "loss"), np.asarray(expected), rtol=1e-5,
                             atol=1e-6)
  scheduled = covrl.KLCov(kl_cov_ratio=0.05, ppo_kl_coef=covrl.schedules.inverse_time(2.0))
  with pytest.raises(ValueError, match="install"):
    run_grpo(scheduled, install=False, steps=1)


def test_bad_options_are_refused():
  pytest.importorskip("tunix")
  with pytest.raises(TypeError, match="control value"):
    ct.register("kl_cov")
  with pytest.raises(ValueError, match="loss_agg_mode"):
    ct.register(covrl.KLCov(), loss_agg_mode="sequence-mean-token-mean")  # tunix's name
  with pytest.raises(ValueError, match="seed"):
    ct.register(covrl.KLCov(), seed=-1)
  assert ct.register(covrl.KLCov()) == "covrl_kl_cov"
  with pytest.raises(ValueError, match="not a loss registered"):
    ct.registered("grpo")

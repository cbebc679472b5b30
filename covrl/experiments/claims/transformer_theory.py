"""Checks of the theory in the transformer lab: T1.7, T1.8 and T3.6 in a Flax policy.

They use the lab setting of `covrl.transformer.lab` at the claim's size: a small decoder-only
transformer, warm-started by supervised learning on noisy demonstrations of a sorting task, and
run on one rollout batch of the warm-started policy.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import covrl
from covrl.experiments.claims import _util as u
from covrl.experiments.claims.registry import Measurement, register
from covrl.transformer import grpo, lab, sampling
from covrl.transformer.grpo import Trainer
from covrl.transformer.loss import Batch, normalize_control, policy_loss

_T1 = "proofs/T1_entropy_covariance.md"
_T3 = "proofs/T3_covariance_control.md"


def _seed(key: jax.Array) -> int:
  return int(jax.random.randint(key, (), 0, 2**31 - 1))


def _trainer(size: str) -> Trainer:
  return grpo.get_trainer(lab.lab_config(size))


@functools.lru_cache(maxsize=8)
def _batch(size: str, seed: int) -> tuple[Any, Batch, jax.Array]:
  """Warm-started parameters, one rollout batch (with old log-probs, raw rewards) at a size."""
  trainer = _trainer(size)
  key = jax.random.key(seed)
  params = trainer.warm_start(jax.random.fold_in(key, 0))
  _, rewards, batch, _ = trainer.batch(params, jax.random.fold_in(key, 1))
  return params, batch, rewards


@functools.lru_cache(maxsize=8)
def _loss_grad(size: str):
  """Jitted (params, mini-batch, control, on_policy, key) -> (grad of the GRPO loss, metrics)."""
  trainer = _trainer(size)

  @jax.jit
  def grad(params, mb, control, on_policy, key):
    fn = lambda p: policy_loss(trainer.config, trainer.model, p, mb, key, control, 0,
                                    on_policy)
    g, (metrics, _) = jax.grad(fn, has_aux=True)(params)
    return g, metrics

  return grad


def _halves(batch: Batch) -> tuple[Batch, Batch]:
  """The first and second mini-batch of a two-way split (the loop's first two updates)."""
  half = batch.responses.shape[0] // 2
  return jax.tree.map(lambda x: x[:half], batch), jax.tree.map(lambda x: x[half:], batch)


def _to64(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating)
                      else x, tree)


def _slope(x, y) -> float:
  return float(np.polyfit(np.log(x), np.log(y), 1)[0])


# ------------------------------------------------------------------------------------------ T1.7


def _plot_t17(m: Measurement, fig) -> None:
  ax1, ax2 = fig.subplots(1, 2)
  s = m.series
  ax1.scatter(s["predicted"], s["actual"], s=6, alpha=0.5)
  lim = [min(np.min(s["predicted"]), np.min(s["actual"])),
         max(np.max(s["predicted"]), np.max(s["actual"]))]
  ax1.plot(lim, lim, "k--", lw=1)
  ax1.set_xlabel("predicted -Cov(log pi, dz)")
  ax1.set_ylabel("actual entropy change")
  ax1.set_title(f"per context, one step at lr {s['train_lr']:g}")
  ax2.loglog(s["lrs"], s["rms_error"], "o-", label="|actual - predicted| (RMS)")
  ax2.loglog(s["lrs"], s["rms_actual"], "s-", label="|actual| (RMS)")
  ax2.set_xlabel("learning rate")
  ax2.legend(fontsize=8)


@register("T1.7", "Per context in a transformer, one optimizer step changes the entropy by "
          "-Cov(log pi, dz) + O(lr^2)", group="transformer", proof=f"{_T1}#T1.7", plot=_plot_t17)
@u.float64
def check_first_order_transformer(size: str, key: jax.Array) -> Measurement:
  return _first_order(size, key)


def _first_order(size: str, key: jax.Array) -> Measurement:
  trainer = _trainer(size)
  cfg = trainer.config
  params, batch, _ = _batch(size, _seed(key))
  # The loop's first update: the first mini-batch, on-policy, in float64.
  params, batch = _to64(params), _to64(_halves(batch)[0])
  control = normalize_control(covrl.NoControl(), cfg.ratio_bound)
  grads, _ = _loss_grad(size)(params, batch, control, True, key)
  # The claim is about the small-step limit: the slope is read from a decade and a half below
  # a tenth of the training step; the wider grid (up to 3x the training lr) is for the figure.
  train_lr = cfg.learning_rate
  lrs = train_lr * np.geomspace(3.0, 1e-3, 12)
  asymptotic = lrs <= train_lr / 10

  @jax.jit
  def change(lr):
    # One step of the run's optimizer (Adam: its first step moves every parameter by about
    # lr * sign(g), so dz is proportional to lr to first order).
    opt = grpo.make_optimizer(cfg)
    updates, _ = opt.update(grads, opt.init(params), params)
    new = jax.tree.map(lambda p, u: p + u * (lr / cfg.learning_rate), params, updates)
    z0 = sampling.response_logits(trainer.model, params, batch.prompts, batch.responses,
                                  cfg.temperature)
    z1 = sampling.response_logits(trainer.model, new, batch.prompts, batch.responses,
                                  cfg.temperature)
    actual = covrl.entropy(z1) - covrl.entropy(z0)
    predicted = covrl.entropy_change_first_order(z0, z1 - z0)
    return actual, predicted

  mask = np.asarray(batch.response_mask)
  rms = lambda x: float(np.sqrt(np.mean(np.square(np.asarray(x)[mask]))))
  rms_err, rms_act = [], []
  for lr in lrs:
    actual, predicted = change(lr)
    rms_err.append(rms(actual - predicted))
    rms_act.append(rms(actual))
  slope_err = _slope(lrs[asymptotic], np.asarray(rms_err)[asymptotic])
  slope_act = _slope(lrs[asymptotic], np.asarray(rms_act)[asymptotic])
  actual, predicted = change(train_lr)
  actual, predicted = np.asarray(actual)[mask], np.asarray(predicted)[mask]
  corr = float(np.corrcoef(actual, predicted)[0, 1])
  rel_train = float(np.sqrt(np.mean((actual - predicted) ** 2) / np.mean(actual**2)))
  passed = abs(slope_err - 2.0) <= 0.2 and abs(slope_act - 1.0) <= 0.1
  return Measurement(
      passed,
      {"error_slope": slope_err, "change_slope": slope_act,
       "relative_rms_error_at_train_lr": rel_train, "corr_at_train_lr": corr,
       "contexts": int(mask.sum())},
      {"error_slope": "2 +- 0.2 (error O(lr^2)), lr <= train lr / 10",
       "change_slope": "1 +- 0.1 (change O(lr))"},
      f"per-context error of -Cov(log pi, dz) shrinks with slope {slope_err:.2f} in the learning "
      f"rate (theory 2), the change itself with slope {slope_act:.2f} (theory 1); at the training "
      f"lr {train_lr:g} the relative RMS error is {rel_train:.1%} (corr {corr:.4f})",
      series={"lrs": lrs, "rms_error": np.asarray(rms_err), "rms_actual": np.asarray(rms_act),
              "actual": actual, "predicted": predicted, "train_lr": train_lr},
      notes="dz is the actual change of the tempered logits of every context of the first "
            "mini-batch after one Adam step on the GRPO loss (float64); every parameter moves, "
            "so every context's logits move, not only the sampled tokens'. The slope is read in "
            "the small-step limit (lr <= training lr / 10); at the training lr itself Adam's "
            "first step moves every parameter by about lr, and the first-order prediction is "
            "only as good as the relative error above says.",
  )


# -------------------------------------------------------------------------------------- T1.8.tf


def _mc_q_values(trainer: Trainer, params, batch: Batch, key, num_rollouts: int):
  """Monte Carlo Q(s, a) for every context s of the batch and every token a: [B, R, V].

  The context (prompt, y_<t) is extended by a, the rest of the response is sampled from the
  policy `num_rollouts` times, and the task's reward is averaged (at the last position the
  reward is a function of the context and a, so it is exact).
  """
  cfg, task = trainer.config, trainer.config.task
  b, r = batch.responses.shape
  v = trainer.model.config.vocab_size
  p = batch.prompts.shape[1]
  tokens = jnp.concatenate([batch.prompts, batch.responses], axis=1)  # [B, P + R]
  # One call completes every context of every position t < R - 1 (rows start at t + 1).
  grid = jnp.broadcast_to(tokens[:, None, None], (b, r, v, p + r))
  grid = jnp.where(jnp.arange(p + r) == p + jnp.arange(r)[:, None, None], jnp.arange(v)[:, None],
                   grid)  # [B, R, V, P + R]: response token t replaced by a
  early = jnp.repeat(grid[:, :r - 1].reshape(-1, p + r), num_rollouts, axis=0)
  start = jnp.repeat(jnp.broadcast_to(jnp.arange(1, r)[:, None], (r - 1, v)).reshape(-1),
                     num_rollouts)
  start = jnp.tile(start, b)
  complete = jax.jit(sampling.complete, static_argnames=(
      "model", "prompt_length", "temperature", "first"))
  q = []
  if r > 1:
    responses = complete(trainer.model, params, early, start, key, prompt_length=p,
                         temperature=cfg.temperature, first=1)
    rewards = task.score(early[:, :p], responses).reshape(b, r - 1, v, num_rollouts)
    q.append(rewards.mean(-1))
  last = grid[:, r - 1].reshape(-1, p + r)  # the last token fixes the reward: exact
  q.append(task.score(last[:, :p], last[:, p:]).reshape(b, 1, v))
  return jnp.concatenate(q, axis=1)


def _plot_t18(m: Measurement, fig) -> None:
  ax1, ax2 = fig.subplots(1, 2)
  s = m.series
  names = ["pooled (measured)", "predicted", "within part", "between part"]
  values = [s["pooled"], s["predicted"], s["within"], s["between"]]
  ax1.bar(range(4), values, color=["C0", "C1", "C2", "C3"])
  ax1.errorbar([0], [s["pooled"]], yerr=[2 * s["se"]], color="k", capsize=4)
  ax1.set_xticks(range(4), names, rotation=20, fontsize=8)
  ax1.set_title("mean c_i and its decomposition")
  ax2.scatter(s["within_token"], s["pooled_token"], s=5, alpha=0.4)
  ax2.set_xlabel("within-state product (log pi + H)(Q - V)")
  ax2.set_ylabel("pooled c_i")


@register("T1.8.tf", "In a transformer, the pooled batch covariance against the within-state "
          "covariance", group="transformer", proof=f"{_T1}#T1.8", plot=_plot_t18)
@u.full_float32
def check_pooled_vs_within_transformer(size: str, key: jax.Array) -> Measurement:
  trainer = _trainer(size)
  cfg = trainer.config
  seed = _seed(key)
  params, _, _ = _batch(size, seed)
  num_batches, num_rollouts = {"test": (2, 1), "fast": (1, 2), "full": (4, 4)}[size]
  g = cfg.group_size
  shrink = 1.0 - 1.0 / g
  terms = {name: [] for name in ("c", "within", "between", "mask", "within_token")}
  for i in range(num_batches):
    _, rewards, batch, _ = trainer.batch(params, jax.random.key(seed + 10 + i))
    q = np.asarray(_mc_q_values(trainer, params, batch, jax.random.key(seed + 100 + i),
                                num_rollouts), np.float64)
    logits = np.asarray(jax.jit(sampling.response_logits, static_argnums=(0, 4))(
        trainer.model, params, batch.prompts, batch.responses, cfg.temperature), np.float64)
    logp_all = logits - logits.max(-1, keepdims=True)
    logp_all = logp_all - np.log(np.sum(np.exp(logp_all), -1, keepdims=True))
    pi = np.exp(logp_all)
    entropy = -np.sum(pi * logp_all, -1)  # [B, R]
    value = np.sum(pi * q, -1)  # V(s) = E_pi Q(s, .)
    y = np.asarray(batch.responses)
    logp = np.take_along_axis(logp_all, y[..., None], -1)[..., 0]
    mask = np.asarray(batch.response_mask)
    # Raw centred advantages r - mean_group(r): E[A | s, y] = (1 - 1/G)(Q(s, y) - V(x)).
    r = np.asarray(rewards, np.float64).reshape(-1, g)
    adv = np.broadcast_to((r - r.mean(1, keepdims=True)).reshape(-1)[:, None], mask.shape)
    terms["c"].append(np.asarray(covrl.token_covariance(
        jnp.asarray(logp), jnp.asarray(adv), jnp.asarray(mask))))
    terms["within"].append(shrink * np.sum(
        pi * (logp_all + entropy[..., None]) * (q - value[..., None]), -1))
    # V(x) is V at the first response position; the batch mean of log pi centres c_i.
    terms["between"].append(shrink * (-entropy - logp[mask].mean()) * (value - value[:, :1]))
    terms["mask"].append(mask)
    terms["within_token"].append(
        (logp + entropy) * (np.take_along_axis(q, y[..., None], -1)[..., 0] - value))
  c, within_t, between_t, mask, within_token = (np.concatenate(terms[k]) for k in (
      "c", "within", "between", "mask", "within_token"))
  groups = mask.shape[0] // g

  def per_group(x):
    return np.sum(np.where(mask, x, 0.0).reshape(groups, -1), 1)

  n_g = np.sum(mask.reshape(groups, -1), 1)
  diff_g = per_group(c - within_t - between_t)
  picks = np.random.default_rng(seed).integers(0, groups, size=(2000, groups))
  se = float((diff_g[picks].sum(1) / n_g[picks].sum(1)).std(ddof=1))
  n = mask.sum()
  pooled = float(per_group(c).sum() / n)
  within = float(per_group(within_t).sum() / n)
  between = float(per_group(between_t).sum() / n)
  predicted = within + between
  z = (pooled - predicted) / se
  # As a per-token proxy: rank agreement of c_i with the within-state product of its token.
  cv, wv = c[mask], within_token[mask]
  spearman = float(np.corrcoef(np.argsort(np.argsort(cv)), np.argsort(np.argsort(wv)))[0, 1])
  k = max(1, int(0.05 * cv.size))
  overlap = len(set(np.argsort(-cv)[:k]) & set(np.argsort(-wv)[:k])) / k
  passed = bool(abs(z) <= 4.0)
  return Measurement(
      passed,
      {"pooled_mean_c": pooled, "within_part": within, "between_part": between,
       "within_share": within / pooled if pooled else float("nan"), "z": z,
       "spearman_c_vs_within_token": spearman, "top5pct_overlap": overlap,
       "tokens": int(n), "groups": groups, "mc_rollouts": num_rollouts},
      {"pooled_mean_c": predicted,
       "rule": "E[c_i | s_i] = (1 - 1/G) [Cov_pi(log pi, Q) + (-H(s_i) - mean log pi)"
               "(V(s_i) - V(x_i))] up to O(1/N); |z| <= 4 (bootstrap over groups)"},
      f"pooled mean c_i {pooled:.4f} vs within + between {predicted:.4f} (z = {z:+.2f}); the "
      f"within-state part is {within / pooled if pooled else float('nan'):.0%} of it; per "
      f"token, Spearman {spearman:.2f} with the within-state product, top-5% overlap "
      f"{overlap:.0%}",
      series={"pooled": pooled, "predicted": predicted, "within": within, "between": between,
              "se": se, "pooled_token": cv, "within_token": wv},
      notes="Q(s, a) is a Monte Carlo estimate for every context and every token (the response "
            "is completed by the policy); advantages are raw rewards centred per group, for which "
            "the expectation is exact (GRPO's division by the group std is a further, random "
            "rescaling). The between-state term comes from tokens whose contexts differ in "
            "entropy and in value; c_i mixes it in, which is what Clip-Cov and KL-Cov rank by.",
  )


# -------------------------------------------------------------------------------------- T3.6.tf


@register("T3.6.tf", "In a transformer, KL-Cov is inert on the first (on-policy) update and acts "
          "from the second", group="transformer", proof=f"{_T3}#T3.6")
@u.float64
def check_kl_cov_on_policy_transformer(size: str, key: jax.Array) -> Measurement:
  return _kl_cov_on_policy(size, key)


def _kl_cov_on_policy(size: str, key: jax.Array) -> Measurement:
  trainer = _trainer(size)
  cfg = trainer.config
  params32, batch32, _ = _batch(size, _seed(key))
  params = _to64(params32)
  first, second = _halves(_to64(batch32))
  ratio = lab.lab_methods(cfg.num_steps)[5].kl_cov_ratio  # the lab's KL-Cov k
  on, off = (normalize_control(covrl.KLCov(kl_cov_ratio=ratio, ppo_kl_coef=beta), cfg.ratio_bound)
             for beta in (1.0, 0.0))
  grad = lambda p, mb, control, on_policy: _loss_grad(size)(p, mb, control, on_policy, key)

  def rel(a, b):
    diff = _norm(jax.tree.map(lambda x, y: x - y, a, b))
    return float(diff / _norm(b))

  g1, m1 = grad(params, first, on, True)
  g1_off, _ = grad(params, first, off, True)
  first_change = rel(g1, g1_off)
  # One Adam step on the first mini-batch, then the second mini-batch is off-policy by one step.
  opt = grpo.make_optimizer(cfg)
  updates, _ = opt.update(g1, opt.init(params), params)
  stepped = jax.tree.map(lambda p, u: p + u, params, updates)
  g2, m2 = grad(stepped, second, on, False)
  g2_off, _ = grad(stepped, second, off, False)
  second_change = rel(g2, g2_off)
  # What a port that recomputes log pi_old in a separate forward pass (as verl does) would feed
  # the first update: the rollout's old log-probs against this mini-batch's own forward pass.
  first32 = _halves(batch32)[0]
  own = jax.jit(lambda p, mb: sampling.token_log_probs(sampling.response_logits(
      trainer.model, p, mb.prompts, mb.responses, cfg.temperature), mb.responses))(
          params32, first32)
  diff = np.abs(np.asarray(own) - np.asarray(first32.old_log_probs))[np.asarray(
      first32.response_mask)]
  roundoff, roundoff_frac = float(diff.max()), float(np.mean(diff > 0))
  passed = (first_change == 0.0 and second_change > 1e-8 and float(m1["selected_frac"]) > 0
            and float(m2["selected_frac"]) > 0)
  return Measurement(
      passed,
      {"first_update_grad_change": first_change, "second_update_grad_change": second_change,
       "selected_frac_first": float(m1["selected_frac"]),
       "selected_frac_second": float(m2["selected_frac"]),
       "float32_old_log_prob_roundoff": roundoff,
       "float32_tokens_with_roundoff": roundoff_frac},
      {"first_update_grad_change": "0 exactly", "second_update_grad_change": "> 1e-8 (float64)"},
      f"KL-Cov's penalty (beta = 1, k = {ratio:g}) changes the first, on-policy gradient by "
      f"{first_change:.1e} and the second by {second_change:.1e} (relative); recomputed float32 "
      f"old log-probs differ from the update's own by up to {roundoff:.1e} on "
      f"{roundoff_frac:.0%} of tokens",
      notes="The training loop makes its first update exactly on-policy (old log-probs = the "
            "current ones), so KL-Cov is inert there as the theory says. A port that recomputes "
            "log pi_old in a separate forward pass (another batch shape, kernel or engine) gets "
            "round-off-sized log-ratios on some tokens (the last two numbers, in float32); "
            "since |x| has gradient sign(x) for any x != 0, the penalty then acts at full "
            "strength, with the sign of the round-off, on the selected ones of those tokens.",
  )


def _norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))

"""Checks of THEORY.md T3 (covariance-based control is sparse and, annealed, unbiased).

The losses are covrl's (`clip_cov_loss`, `kl_cov_loss`, `ppo_loss`, `policy_gradient_loss`,
`entropy_bonus_loss`) on sampled tokens laid out as [N, 1] (N one-token responses), and the
dynamics are covrl's sampled tabular PPO/GRPO loop (`covrl.tabular`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import covrl
from covrl.experiments.claims import _util as u
from covrl.experiments.claims.registry import Measurement, register

MEANS = (0.8, 0.6, 0.5, 0.2)  # the Bernoulli bandit of the dynamics checks


def batch(key: jax.Array, n: int, *, num_states: int = 16, num_actions: int = 8,
          group: int = 8, scale: float = 2.0, dtype=jnp.float32):
  """Tokens of a random contextual policy: (logits [S, K], states, actions, GRPO advantages)."""
  k_z, k_r, k_s, k_a, k_b = jax.random.split(key, 5)
  logits = scale * jax.random.normal(k_z, (num_states, num_actions), dtype)
  means = jax.random.uniform(k_r, (num_states, num_actions), dtype)
  states = jnp.repeat(jax.random.randint(k_s, (n // group,), 0, num_states), group)
  actions = jax.random.categorical(k_a, logits[states])
  rewards = jax.random.bernoulli(k_b, means[states, actions]).astype(dtype)
  adv = covrl.grpo_advantages(rewards.reshape(-1, group)).reshape(-1)
  return logits, states, actions, adv


def column(x):
  return x[:, None]


# ----------------------------------------------------------------------------------------- T3.1


@functools.partial(jax.jit, static_argnums=(1, 3))
def _all_fractions(key: jax.Array, sizes: tuple[int, ...], ratios: jax.Array, max_ratio: float):
  """_fractions for every batch size, in one compiled program."""
  return [_fractions(key, n, ratios, max_ratio) for n in sizes]


def _fractions(key: jax.Array, n: int, ratios: jax.Array, max_ratio: float):
  """Fractions of tokens KL-Cov and Clip-Cov select, per ratio, on one batch of n tokens."""
  logits, states, actions, adv = batch(key, n)
  lp = column(jax.nn.log_softmax(logits)[states, actions])
  a = column(adv)
  mask = jnp.ones_like(lp, bool)

  def one(ratio):
    _, kl = covrl.kl_cov_loss(lp, lp, a, mask, kl_cov_ratio=ratio, max_ratio=max_ratio)
    _, cc = covrl.clip_cov_loss(lp, lp, a, mask, clip_cov_ratio=ratio, max_ratio=max_ratio, key=key)
    return kl["selected_frac"], cc["selected_frac"]

  return jax.vmap(one)(ratios)


@functools.partial(jax.jit, static_argnums=1)
def _bonus_touched(key: jax.Array, n: int) -> jax.Array:
  """Fraction of (token, vocabulary) logit entries the entropy bonus's gradient touches."""
  logits, states, _, _ = batch(key, n)
  per_token = logits[states][:, None, :]
  grad = jax.grad(lambda x: covrl.entropy_bonus_loss(x, jnp.ones((n, 1), bool), coef=0.01)[0])(
      per_token)
  return jnp.mean(grad != 0)


def _plot_sparsity(m: Measurement, fig) -> None:
  ax = fig.subplots()
  sizes = np.asarray(m.series["num_tokens"])
  for ratio, kl, cc in zip(m.series["ratios"], m.series["kl_cov"], m.series["clip_cov"]):
    line, = ax.loglog(sizes, kl, "o-", label=f"KL-Cov, k = {ratio:g}")
    ax.loglog(sizes, np.maximum(cc, 1e-7), "x:", color=line.get_color(),
              label=f"Clip-Cov, r = {ratio:g}")
    ax.axhline(ratio, color=line.get_color(), lw=0.5)
  ax.axhline(1.0, color="k", label="entropy bonus (every entry)")
  ax.set_xlabel("valid tokens N")
  ax.set_ylabel("fraction of tokens touched")
  ax.legend(fontsize=6, ncol=2)


@register("T3.1", "Sparsity: Clip-Cov / KL-Cov touch a fraction r (k) of tokens; the bonus touches "
          "all", group="tabular", proof=u.proof("T3.1"), plot=_plot_sparsity)
def check_sparsity(size: str, key: jax.Array) -> Measurement:
  sizes = u.pick(size, [64, 1024], [64, 1024, 16384], [64, 1024, 16384, 131072])
  ratios = np.asarray([2e-4, 2e-3, 2e-2, 0.1])
  kl, cc = np.zeros((len(ratios), len(sizes))), np.zeros((len(ratios), len(sizes)))
  for j, out in enumerate(_all_fractions(key, tuple(sizes), jnp.asarray(ratios),
                                        float(ratios.max()))):
    kl[:, j], cc[:, j] = (np.asarray(x) for x in out)
  # The count is max(floor(ratio N), 1): at least one token even when ratio N < 1.
  bound = np.maximum(np.floor(ratios[:, None] * np.asarray(sizes)[None]), 1) / np.asarray(sizes)
  bonus = float(_bonus_touched(key, 1024))
  kl_exact = bool(np.allclose(kl, bound, rtol=1e-6, atol=0))
  cc_below = bool(np.all(cc <= bound * (1 + 1e-6)))
  large = ratios[:, None] * np.asarray(sizes)[None] >= 1
  at_most_r = bool(np.all(kl[large] <= np.broadcast_to(ratios[:, None], kl.shape)[large] + 1e-12))
  passed = kl_exact and cc_below and at_most_r and bonus == 1.0
  small = [(float(r), int(n)) for (i, r) in enumerate(ratios) for (j, n) in enumerate(sizes)
           if not large[i, j]]
  return Measurement(
      passed,
      {"kl_cov_fraction": kl.tolist(), "clip_cov_fraction": cc.tolist(),
       "bonus_fraction_of_entries": bonus, "ratios": ratios.tolist(), "num_tokens": sizes},
      {"kl_cov_fraction": "max(floor(k N), 1) / N exactly (<= k once k N >= 1)",
       "clip_cov_fraction": "<= max(floor(r N), 1) / N (fewer when the band holds fewer)",
       "bonus": "1.0 (every vocabulary entry at every position)"},
      f"KL-Cov touches exactly max(floor(kN),1)/N, Clip-Cov at most that "
      f"(max {cc.max():.2g}), the bonus {100 * bonus:.0f}% of logit entries; with kN < 1 the "
      f"floor of one token gives 1/N > k ({len(small)} of {kl.size} grid points)",
      series={"num_tokens": sizes, "ratios": ratios.tolist(), "kl_cov": kl, "clip_cov": cc},
      notes="THEORY.md says 'at most r (or k)'. That holds once r N >= 1; below, the minimum "
            f"count of one token (verl's) makes the fraction 1/N > r, e.g. at {small[:3]}. "
            "Tokens: one-token responses of a random 16-state, 8-action policy with GRPO "
            "advantages.",
  )


# ----------------------------------------------------------------------------------------- T3.2


def _bias_one(key: jax.Array, n: int, ratio: float, beta: float, step: float):
  """Gradient bias of Clip-Cov and KL-Cov at a second (off-policy) update, and its bound."""
  logits, states, actions, adv = batch(key, n, dtype=jnp.float64)
  a, mask = column(adv), jnp.ones((n, 1), bool)
  gather = lambda z: column(jax.nn.log_softmax(z)[states, actions])
  old = jax.lax.stop_gradient(gather(logits))
  # One SGD step on the PPO loss, so that the second update is off-policy (log pi != log pi_old).
  first = jax.grad(lambda z: covrl.ppo_loss(old, gather(z), a, mask, clip_ratio_c=None)[0])(
      logits)
  z = logits - step * first

  def grad_of(fn):
    return jax.grad(lambda z: fn(z)[0])(z)

  g_ppo = grad_of(lambda z: covrl.ppo_loss(old, gather(z), a, mask, clip_ratio_c=None))
  g_cc = grad_of(lambda z: covrl.clip_cov_loss(old, gather(z), a, mask,
                                               clip_cov_ratio=ratio, key=key))
  _, cc_metrics = covrl.clip_cov_loss(old, gather(z), a, mask, clip_cov_ratio=ratio, key=key)
  g_pg = grad_of(lambda z: covrl.policy_gradient_loss(old, gather(z), a, mask))
  g_kl = grad_of(lambda z: covrl.kl_cov_loss(old, gather(z), a, mask, kl_cov_ratio=ratio,
                                             ppo_kl_coef=beta))
  _, kl_metrics = covrl.kl_cov_loss(old, gather(z), a, mask, kl_cov_ratio=ratio, ppo_kl_coef=beta)

  # Largest per-token gradients (of a token's own loss, before the 1/N of the token mean).
  def token_grad(i, fn):
    return jnp.linalg.norm(jax.grad(lambda z: fn(z, i))(z))

  ppo_token = lambda z, i: covrl.ppo_loss(old[i][None], gather(z)[i][None], a[i][None],
                                          mask[i][None], clip_ratio_c=None)[0]
  logp_token = lambda z, i: gather(z)[i, 0]
  idx = jnp.arange(n)
  max_ppo = jnp.max(jax.vmap(lambda i: token_grad(i, ppo_token))(idx))
  max_logp = jnp.max(jax.vmap(lambda i: token_grad(i, logp_token))(idx))
  cc_bias = jnp.linalg.norm(g_cc - g_ppo)
  kl_bias = jnp.linalg.norm(g_kl - g_pg)
  cc_frac, kl_frac = cc_metrics["selected_frac"], kl_metrics["selected_frac"]
  return (cc_bias, cc_frac * max_ppo, kl_bias, kl_frac * beta * max_logp, cc_frac, kl_frac,
          jnp.linalg.norm(g_ppo))


def _plot_bias_bound(m: Measurement, fig) -> None:
  ax = fig.subplots()
  for name in ("clip_cov", "kl_cov"):
    ax.loglog(m.series[f"{name}_bound"], m.series[f"{name}_bias"], "o", label=name, alpha=0.6)
  lim = [min(np.min(m.series["kl_cov_bound"]), np.min(m.series["clip_cov_bound"])),
         max(np.max(m.series["kl_cov_bound"]), np.max(m.series["clip_cov_bound"]))]
  ax.loglog(lim, lim, "k--", label="bias = bound")
  ax.set_xlabel("bound: fraction selected x largest per-token gradient")
  ax.set_ylabel("|grad(method) - grad(base loss)|")
  ax.legend()


@register("T3.2", "Bias bound: |gradient bias| <= r (k beta) x the largest per-token gradient",
          group="tabular", proof=u.proof("T3.2"), plot=_plot_bias_bound)
@u.float64
def check_bias_bound(size: str, key: jax.Array) -> Measurement:
  batches = u.pick(size, 8, 64, 256)
  n, ratio, beta = 256, 0.02, 1.0
  fn = jax.jit(jax.vmap(lambda k: _bias_one(k, n, ratio, beta, 1.0)))
  out = [np.asarray(x) for x in fn(jax.random.split(key, batches))]
  cc_bias, cc_bound, kl_bias, kl_bound, cc_frac, kl_frac, base = out
  cc_ratio = np.where(cc_bound > 0, cc_bias / np.maximum(cc_bound, 1e-300), 0.0)
  kl_ratio = kl_bias / kl_bound
  tol = 1e-9
  passed = bool(np.all(cc_bias <= cc_bound * (1 + tol) + 1e-15)
                and np.all(kl_bias <= kl_bound * (1 + tol)) and kl_frac.max() <= ratio
                and cc_frac.max() <= ratio and np.all(kl_bias > 0))
  return Measurement(
      passed,
      {"clip_cov_max_bias_over_bound": float(cc_ratio.max()),
       "kl_cov_max_bias_over_bound": float(kl_ratio.max()),
       "clip_cov_mean_selected_frac": float(cc_frac.mean()),
       "kl_cov_selected_frac": float(kl_frac.mean()),
       "kl_cov_mean_bias_relative_to_pg_gradient": float(np.mean(kl_bias / base)),
       "batches": batches, "tokens": n},
      {"bound": "|bias| <= (selected / N) x max_i |grad loss_i| (x beta for KL-Cov), and "
                f"selected / N <= r = k = {ratio}"},
      f"over {batches} off-policy updates (second PPO step, N = {n}, r = k = {ratio}): "
      f"bias / bound at most {cc_ratio.max():.3f} (Clip-Cov), {kl_ratio.max():.3f} (KL-Cov)",
      series={"clip_cov_bias": cc_bias, "clip_cov_bound": cc_bound, "kl_cov_bias": kl_bias,
              "kl_cov_bound": kl_bound},
      notes="Clip-Cov's bias is the gradient of the detached tokens' PPO terms; KL-Cov's is beta "
            "times the sign-weighted gradient of log pi at its selected tokens. The bound uses "
            "the fraction actually selected (Clip-Cov selects fewer when its band holds fewer "
            "candidates, sometimes none).",
  )

"""T3.7: Clip-Cov's absolute band depends on the scale of the advantages; KL-Cov's top-k and the
relative band do not.

c_i = (log pi_i - mean log pi)(A_i - mean A) is linear in the advantages, so multiplying every
advantage by s > 0 multiplies every c_i by s: the order of the c_i (KL-Cov's top-k) is unchanged,
and so is the band (lb s_c, ub s_c) of `ClipCov(band="relative")` (s_c, the spread of c_i,
scales by s too), while verl's absolute band (1, 5) gains or loses tokens. Dr. GRPO's
advantages (no division by the group std) are not one rescaling of GRPO's (each group has its
own std), so there every method's selection changes; the check reports by how much.

The batch is ForkCopy-shaped and synthetic (no model: the claim is about the selection rule):
prompts x group responses x 32 tokens, nearly deterministic copies (pi about 0.98) and one fork
per response whose token decides a 0/1 reward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import covrl
from covrl.experiments.claims import _util as u
from covrl.experiments.claims.registry import Measurement, register

SCALES = (0.1, 0.5, 2.0, 10.0)


def _batch(key: jax.Array, prompts: int, group: int, length: int = 32):
  """(log_prob [B, T], rewards [prompts, group]) of a ForkCopy-shaped batch."""
  k_copy, k_fork, k_p = jax.random.split(key, 3)
  b = prompts * group
  log_prob = jnp.log(jax.random.uniform(k_copy, (b, length), minval=0.95, maxval=0.995))
  p_right = jax.random.uniform(k_p, (prompts, 1), minval=0.1, maxval=0.9)
  right = jax.random.uniform(k_fork, (prompts, group)) < p_right
  # The fork token's probability: the policy's p_right if it took the right answer, else 1 - p.
  p_fork = jnp.where(right, p_right, 1.0 - p_right).reshape(b)
  log_prob = log_prob.at[:, length // 2].set(jnp.log(p_fork))
  return log_prob, right.astype(jnp.float32)


def _selection(control, log_prob, adv, mask, key):
  tokens = covrl.policy_tokens(log_prob, log_prob, adv, mask)  # on-policy: PPO clips nothing
  _, chosen = covrl.select_tokens(control, tokens, control.surrogate(tokens), key=key)
  return np.asarray(chosen.mask)


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
  union = np.sum(a | b)
  return 1.0 if union == 0 else float(np.sum(a & b) / union)


def _plot(m: Measurement, fig) -> None:
  ax = fig.subplots()
  s = m.series
  for name, counts in s["candidates"].items():
    ax.plot(s["scales"], counts, "o-", label=name)
  ax.set_xscale("log")
  ax.set_yscale("symlog", linthresh=1)
  ax.set_xlabel("advantage scale s")
  ax.set_ylabel("candidate tokens in the band")
  ax.legend(fontsize=8)


@register("T3.7", "Scale: Clip-Cov's absolute band changes its selection when the advantages "
          "are rescaled; KL-Cov's top-k and Clip-Cov's relative band do not",
          group="regime", proof=u.proof("T3.7"), plot=_plot)
def check_scale(size: str, key: jax.Array) -> Measurement:
  prompts = u.pick(size, 16, 64, 128)
  group = 8
  log_prob, rewards = _batch(key, prompts, group)
  mask = jnp.ones(log_prob.shape, bool)
  t = log_prob.shape[1]
  grpo = jnp.repeat(covrl.grpo_advantages(rewards).reshape(-1, 1), t, axis=1)
  dr = jnp.repeat(covrl.grpo_advantages(rewards, normalize_std=False).reshape(-1, 1), t, axis=1)
  # Ratios large enough that the draw is not the whole story at the smallest size.
  controls = {
      "clip_cov_absolute": covrl.ClipCov(clip_cov_ratio=2e-3, clip_cov_lb=1.0, clip_cov_ub=5.0),
      "clip_cov_relative": covrl.ClipCov(clip_cov_ratio=2e-3, clip_cov_lb=1.0, clip_cov_ub=5.0,
                                         band="relative"),
      "kl_cov": covrl.KLCov(kl_cov_ratio=2e-3, ppo_kl_coef=1.0),
  }
  sel_key = jax.random.fold_in(key, 1)
  base = {n: _selection(c, log_prob, grpo, mask, sel_key) for n, c in controls.items()}
  jac = {n: [_jaccard(base[n], _selection(c, log_prob, grpo * s, mask, sel_key))
             for s in SCALES] for n, c in controls.items()}
  dr_jac = {n: _jaccard(base[n], _selection(c, log_prob, dr, mask, sel_key))
            for n, c in controls.items()}
  cov = covrl.token_covariance(log_prob, grpo, mask)
  spread = float(jnp.std(cov))
  all_scales = (*SCALES[:2], 1.0, *SCALES[2:])
  candidates = {
      "absolute (1, 5)": [int(covrl.diagnostics.tokens_in_band(cov * s, mask, 1.0, 5.0))
                          for s in all_scales],
      "relative (1, 5) x spread": [int(covrl.diagnostics.tokens_in_band(
          cov * s, mask, spread * s, 5.0 * spread * s)) for s in all_scales],
  }
  invariant = all(v == 1.0 for n in ("clip_cov_relative", "kl_cov") for v in jac[n])
  absolute_moves = len(set(candidates["absolute (1, 5)"])) > 1 and min(
      jac["clip_cov_absolute"]) < 1.0
  passed = bool(invariant and absolute_moves and base["kl_cov"].sum() > 0)
  return Measurement(
      passed,
      {"jaccard_vs_scale": jac, "scales": list(SCALES),
       "jaccard_dr_grpo_vs_grpo": dr_jac, "band_candidates": candidates,
       "selected": {n: int(v.sum()) for n, v in base.items()}, "tokens": int(mask.sum())},
      {"jaccard_vs_scale": "exactly 1 for kl_cov and clip_cov_relative at every scale (c_i is "
                           "linear in A); < 1 for clip_cov_absolute at some scale",
       "jaccard_dr_grpo_vs_grpo": "reported (not a rescaling: each group has its own std)"},
      f"selection overlap with the unscaled one at s = {SCALES}: absolute band "
      f"{[round(v, 2) for v in jac['clip_cov_absolute']]}, relative band "
      f"{jac['clip_cov_relative']}, KL-Cov {jac['kl_cov']}; absolute band candidates "
      f"{candidates['absolute (1, 5)']} over s = {all_scales}; Dr. GRPO vs GRPO overlap: "
      + ", ".join(f"{n} {v:.2f}" for n, v in dr_jac.items()),
      series={"scales": list(all_scales), "candidates": candidates},
      notes="Dr. GRPO divides by no std, so its advantages are GRPO's times each group's std: "
            "a per-group rescaling, under which no method's selection is invariant; the absolute "
            "band's count moves with the overall scale on top of that.",
  )

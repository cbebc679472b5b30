"""THEORY.md "T2/T3 in a network, exactly", T3.3.tf-T3.5.tf: covariance control against the bonus
in a transformer trained with exact expected updates, from a common near-optimal start.

  T3.3.tf  at the optimum (groups of identical best answers, advantages exactly 0) every method's
           gradient but the two bonuses' is exactly 0;
  T3.4.tf  annealed, verl's bonus follows its closed-form gap(alpha_t) to zero, and Clip-Cov and
           KL-Cov annealed from 10x end within 1e-3 of the optimum;
  T3.5.tf  at a fixed coefficient the bonus moves to its closed-form gap (dense, persistent bias)
           while Clip-Cov and KL-Cov stay within 1e-3; every method's bias at its presets and 10x.

Runs in `exact_runs`, references in `exact_references`. Thresholds, fixed before the first run:
OPT_TOL is the issue's; TRACK_FACTOR and MOVE_TOL are ours.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import covrl
from covrl import schedules
from covrl.experiments.claims import _util as u
from covrl.experiments.claims import exact_references as ref
from covrl.experiments.claims import exact_runs as runs_
from covrl.experiments.claims.registry import Measurement, register
from covrl.transformer import exact, sampling, tree
from covrl.transformer.model import TransformerPolicy

OPT_TOL = 1e-3       # "within 1e-3 of the optimum": final gap
TRACK_FACTOR = 2.0   # annealed bonus: gap within this factor of gap*(alpha) at each stage (ours)
MOVE_TOL = 0.1       # fixed bonus: |final gap / gap* - 1| <= this (ours)
GROUP = 5  # not a power of two: a float32 mean of 5 equal values can be an ulp off


def _grads_at_optimum(config: exact.ExactConfig, params, advantages, prompts, responses, key
                      ) -> list[dict[str, float]]:
  """Max |gradient| of every method's loss (at its presets) on a batch of best answers, for each
  [B, T] advantage array of `advantages` (one compiled program for all of them)."""
  model = TransformerPolicy(config.model)
  mask = jnp.ones(responses.shape, jnp.float32)
  values = {name: value for name, (value, _) in runs_.method_strengths().items()}

  @jax.jit
  def all_grads(params, advantages):  # advantages [K, B, T]: one program, vmapped over K
    def one(adv):
      row = {}
      for name, value in values.items():  # the values closed over: their numbers are static

        def loss(p, value=value):
          z = sampling.response_logits(model, p, prompts, responses)
          lp = sampling.token_log_probs(z, responses)
          return covrl.policy_loss(value, jax.lax.stop_gradient(lp), lp, adv, mask, key=key,
                                   logits=z)[0]

        grads = jax.grad(loss)(params)
        row[name] = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grads)]))
      return row

    return jax.vmap(one)(advantages)

  out = all_grads(params, jnp.stack(advantages))
  return [{k: float(v[i]) for k, v in out.items()} for i in range(len(advantages))]


@register("T3.3.tf", "In a network: at the optimum (groups of identical best answers, advantages "
          "exactly 0) the gradient of no control, Clip-Cov, KL-Cov and every other method but "
          "the bonuses is exactly 0", group="exact", proof=u.proof("T3.3.tf"))
def check_optimum(size: str, key: jax.Array) -> Measurement:
  s = runs_.setting(size)
  task = s.task
  start = runs_.near_start(size, u.seed_of(key))
  rows = np.repeat(np.arange(task.num_prompts), GROUP)
  prompts = jnp.asarray(task.prompts[rows])
  responses = jnp.asarray(task.responses[task.best[rows]])
  rewards = jnp.asarray(task.max_reward[rows].reshape(-1, GROUP), jnp.float32)
  adv = covrl.grpo_advantages(rewards).reshape(-1, 1) * jnp.ones(responses.shape, jnp.float32)
  # What the advantages were before covrl made equal-reward groups exactly 0 (the formula as
  # written): on every reward of the task as a group of GROUP equal values, and on these groups.
  naive = lambda r: (r - r.mean(-1, keepdims=True)) / (r.std(-1, ddof=1, keepdims=True) + 1e-6)
  every = jnp.asarray(np.repeat(task.rewards.reshape(-1, 1), GROUP, 1), jnp.float32)
  naive_nonzero = int(jnp.sum(jnp.any(naive(every) != 0, axis=-1)))
  covrl_nonzero = int(jnp.sum(jnp.any(covrl.grpo_advantages(every) != 0, axis=-1)))
  naive_adv = naive(rewards).reshape(-1, 1) * jnp.ones(responses.shape, jnp.float32)
  grads, naive_grads = _grads_at_optimum(start["config"], start["params"], (adv, naive_adv),
                                         prompts, responses, key)
  bonuses = ("entropy", "adaptive_entropy")
  zero = {k: v == 0.0 for k, v in grads.items() if k not in bonuses}
  passed = bool(covrl_nonzero == 0 and float(jnp.max(jnp.abs(adv))) == 0.0 and all(zero.values())
                and all(grads[b] > 0 for b in bonuses))
  return Measurement(
      passed,
      {"max_abs_grad": grads, "advantages_max_abs": float(jnp.max(jnp.abs(adv))),
       "equal_reward_groups": int(every.shape[0]), "naive_nonzero_groups": naive_nonzero,
       "covrl_nonzero_groups": covrl_nonzero,
       "naive_advantages_max_abs": float(jnp.max(jnp.abs(naive_adv))),
       "max_abs_grad_with_naive_advantages": naive_grads,
       "start_gap": start["final_gap"]},
      {"max_abs_grad": "exactly 0 for every method but the bonuses (T3.3, T5.4), > 0 for the "
                       "bonuses (grad H != 0 at a non-uniform, non-deterministic policy)",
       "covrl_nonzero_groups": "0: a group of equal rewards has advantages exactly 0"},
      f"groups of {GROUP} identical best answers: advantages exactly 0 (the formula as written "
      f"leaves {naive_nonzero} of {every.shape[0]} equal-reward float32 groups nonzero, covrl "
      f"{covrl_nonzero}); max |grad| " + ", ".join(f"{k} {v:.3g}" for k, v in grads.items()),
      notes="The network is the common near-optimal start (the end of T3.4.tf's annealed bonus). "
            "At the optimum every sampled response is the best one, so each group holds "
            f"{GROUP} copies of it; with the advantages exactly 0 every term of every loss but "
            "the bonus's entropy has a zero factor (PPO's -A r, KL-Cov's |log pi - log pi_old| "
            "on-policy with |x|'(0) = 0, Clip-Cov's band c > 1 > 0 = c_i, the shaped and "
            "reweighted advantages). With the formula as written, 'max_abs_grad_with_naive_"
            "advantages' is what an ulp of the group mean does to these gradients.",
  )


def _plot_anneal(m: Measurement, fig) -> None:
  ax1, ax2 = fig.subplots(1, 2)
  ser = m.series
  ax1.semilogy(ser["steps"], np.maximum(ser["gap"], 1e-9), label="network (exact)")
  ax1.semilogy(ser["track_steps"], np.maximum(ser["closed"], 1e-9), "k--",
               label="closed form gap(alpha_t)")
  ax1.set_xlabel("exact update t (alpha lowered stage by stage)")
  ax1.set_ylabel("gap of verl's bonus")
  ax1.legend(fontsize=7)
  for label, curve in ser["covariance"].items():
    ax2.semilogy(np.maximum(curve, 1e-9), label=label)
  ax2.axhline(OPT_TOL, color="k", ls=":", lw=0.8, label="1e-3")
  ax2.set_xlabel("exact update from the near-optimal start")
  ax2.set_ylabel("gap")
  ax2.legend(fontsize=6)


@register("T3.4.tf", "In a network: annealed, the bonus's gap follows its closed form "
          "gap(alpha_t) to zero, and Clip-Cov and KL-Cov annealed from 10x end within 1e-3 of "
          "the optimum", group="exact", proof=u.proof("T3.4.tf"), plot=_plot_anneal)
def check_annealed(size: str, key: jax.Array) -> Measurement:
  s = runs_.setting(size)
  seed = u.seed_of(key)
  runs = runs_.continuation(size, seed)
  methods = runs_.method_runs(size, seed)
  task = s.task
  alphas = [st["alpha"] for st in runs["stages"]]
  trained = [float(ref.gaps(task.rewards, tree.response_log_probs(task, st["nodes"][1])).mean())
             for st in runs["stages"]]
  closed = [ref.bonus_fixed_point_gap(task, a) for a in alphas]
  ratio = [g / c for g, c in zip(trained, closed)]
  follows = all(1 / TRACK_FACTOR <= r <= TRACK_FACTOR for r in ratio)
  to_zero = trained[-1] <= OPT_TOL
  annealed = {n: methods[(n, "annealed")]["gap"] for n in ("clip_cov", "kl_cov")}
  within = all(g <= OPT_TOL for g in annealed.values())
  passed = bool(follows and to_zero and within)
  # The per-step curve against the closed form at the step's alpha (ramps included).
  steps = runs["steps_per_stage"]
  curve = np.concatenate([st["gap_curve"][1] for st in runs["stages"]])
  alpha_t = np.concatenate([
      np.asarray(schedules.GeometricRamp(a0, a1, steps // 2)(np.arange(steps)))
      for a0, a1 in zip([alphas[0], *alphas[:-1]], alphas)])
  marks = np.unique(np.linspace(0, len(curve) - 1, 40).astype(int))
  return Measurement(
      passed,
      {"alphas": alphas, "bonus_gap": trained, "closed_form_gap": closed,
       "ratio_to_closed_form": ratio, "covariance_annealed_final_gap": annealed,
       "start_gap": methods["start_gap"],
       "covariance_fixed_10x_final_gap": {n: methods[(n, "10x")]["gap"]
                                          for n in ("clip_cov", "kl_cov")}},
      {"bonus": f"at the end of every alpha, gap within x{TRACK_FACTOR:g} of the closed form; "
                f"final gap <= {OPT_TOL:g}",
       "covariance_annealed_final_gap": f"<= {OPT_TOL:g} (Clip-Cov's ratio and KL-Cov's beta "
                                        "annealed from 10x their presets as 1 / (1 + t / t0))"},
      "verl's bonus annealed, gap vs closed form: " + ", ".join(
          f"{a:g}: {g:.2e} / {c:.2e}" for a, g, c in zip(alphas, trained, closed)) +
      "; Clip-Cov / KL-Cov annealed from 10x: " + ", ".join(
          f"{k} {v:.2e}" for k, v in annealed.items()) + " (at 10x fixed: " + ", ".join(
          f"{n} {methods[(n, '10x')]['gap']:.2e}" for n in ("clip_cov", "kl_cov")) + ")",
      series={"steps": np.arange(len(curve)), "gap": curve, "track_steps": marks,
              "closed": [ref.bonus_fixed_point_gap(task, float(alpha_t[i])) for i in marks],
              "covariance": {f"{n} {tag}": methods[(n, tag)]["gap_curve"]
                             for n in ("clip_cov", "kl_cov") for tag in ("10x", "annealed")}},
      notes="The bonus (verl's per-token form) is T2.tf's continuation run on to alpha = "
            f"{runs_.TAIL[-1]:g}: alpha lowered geometrically (covrl.schedules.GeometricRamp) "
            f"from {runs_.ALPHAS[0]:g}, {steps} exact updates per value, Adam at peak "
            "min(2e-3, alpha / 15). The covariance methods anneal from its end (the common "
            "near-optimal start): from a random start exact PG itself can settle on a wrong "
            "answer in this budget, which is not the claim. Near the optimum the runs use Adam "
            "at 1e-4: at 1e-3, Adam's steps, which do not shrink with the gradient, let Clip-Cov "
            "leave the optimum (proofs/T3_covariance_control.md#T3.4.tf).",
  )


def _plot_bias(m: Measurement, fig) -> None:
  ax1, ax2 = fig.subplots(1, 2)
  curves = m.series["curves"]
  for label in ("none preset", "entropy preset", "clip_cov preset", "kl_cov preset"):
    if label in curves:
      ax1.semilogy(np.maximum(curves[label], 1e-9), label=label.replace(" preset", ""))
  ax1.axhline(m.measured["bonus_closed_form"], color="C1", ls="--", lw=0.8,
              label="the bonus's closed form")
  ax1.axhline(OPT_TOL, color="k", ls=":", lw=0.8, label="1e-3")
  ax1.set_xlabel("exact rollout from the near-optimal start")
  ax1.set_ylabel("gap r* - E[R]")
  ax1.legend(fontsize=6)
  rows = m.measured["bias_table"]
  names = list(rows)
  x = np.arange(len(names))
  ax2.bar(x - 0.2, [max(rows[n]["preset"], 1e-9) for n in names], 0.4, label="preset")
  ax2.bar(x + 0.2, [max(rows[n].get("10x", np.nan), 1e-9) for n in names], 0.4, label="10x")
  ax2.axhline(OPT_TOL, color="k", ls=":", lw=0.8, label="1e-3")
  ax2.axhline(m.measured["start_gap"], color="0.5", ls="--", lw=0.8, label="start")
  ax2.set_yscale("log")
  ax2.set_xticks(x, names, rotation=60, fontsize=6)
  ax2.set_ylabel("final gap (bias at a fixed strength)")
  ax2.legend(fontsize=6)


def bias_table(measurement: Measurement) -> str:
  """T3.5.tf's bias table as Markdown: every method's exact final gap from the common start."""
  rows = measurement.measured["bias_table"]
  lines = ["| method | gap at its presets | gap at 10x | touched (preset) | within 1e-3 |",
           "|---|---|---|---|---|"]
  for name, r in rows.items():
    strong = f"{r['10x']:.2e}" if "10x" in r else "-"
    lines.append(f"| {name} | {r['preset']:.2e} | {strong} | {r['preset_touched']:.3g} | "
                 f"{'yes' if r['zero_to_tolerance'] else 'no'} |")
  return "\n".join(lines)


@register("T3.5.tf", "In a network: from a common near-optimal start at a fixed coefficient the "
          "bonus moves to its closed-form gap (dense, persistent bias) while Clip-Cov and KL-Cov "
          "stay within 1e-3 of the optimum; every method's bias measured", group="exact",
          proof=u.proof("T3.5.tf"), plot=_plot_bias)
def check_fixed(size: str, key: jax.Array) -> Measurement:
  s = runs_.setting(size)
  runs = runs_.method_runs(size, u.seed_of(key))
  alpha = runs_.method_strengths()["entropy"][0].entropy_coeff
  closed = ref.bonus_fixed_point_gap(s.task, alpha)
  strong = runs_.method_strengths()["entropy"][1].entropy_coeff
  closed_10x = ref.bonus_fixed_point_gap(s.task, strong)
  bonus = runs[("entropy", "preset")]["gap"]
  moves = abs(bonus / closed - 1.0) <= MOVE_TOL
  stay = {n: runs[(n, "preset")]["gap"] for n in ("clip_cov", "kl_cov")}
  passed = bool(moves and all(g <= OPT_TOL for g in stay.values()))
  table = {}
  for (name, tag), row in ((k, v) for k, v in runs.items() if isinstance(k, tuple)):
    if tag != "annealed":
      table.setdefault(name, {})[tag] = row["gap"]
      table[name][f"{tag}_touched"] = row["touched"]
  for row in table.values():
    row["zero_to_tolerance"] = all(v <= OPT_TOL for k, v in row.items()
                                   if k in ("preset", "10x"))
  return Measurement(
      passed,
      {"bonus_gap": bonus, "bonus_closed_form": closed, "bonus_10x_gap": runs[("entropy", "10x")][
          "gap"], "bonus_10x_closed_form": closed_10x, "covariance_gap": stay,
       "start_gap": runs["start_gap"], "steps": runs["steps"], "bias_table": table},
      {"bonus_gap": f"within {MOVE_TOL:.0%} of its closed form (verl's bonus at alpha "
                    f"{alpha:g}, the fixed point of pi_s = softmax(Q^pi/alpha))",
       "covariance_gap": f"<= {OPT_TOL:g} (Clip-Cov and KL-Cov at their presets)",
       "bias_table": "every method at its presets and at 10x: measured, reported"},
      f"from gap {runs['start_gap']:.2e}: the bonus at {alpha:g} moves to {bonus:.3e} (closed "
      f"form {closed:.3e}); Clip-Cov {stay['clip_cov']:.2e}, KL-Cov {stay['kl_cov']:.2e}; "
      "bias (preset / 10x): " + ", ".join(
          f"{n} {r['preset']:.2e}" + (f" / {r['10x']:.2e}" if "10x" in r else "")
          for n, r in table.items()),
      series={"curves": {f"{k[0]} {k[1]}": v["gap_curve"] for k, v in runs.items()
                         if isinstance(k, tuple) and k[1] != "annealed"}},
      notes=f"{runs['steps']} exact rollouts of 2 epochs each from the end of T3.4.tf's annealed "
            "bonus, Adam at 1e-4 (warm-up 100, then constant): the step at which the expected "
            "update's near-optimum dynamics are resolved (at 1e-3, Clip-Cov at verl's default "
            "leaves the optimum under Adam, measured in the proof). 10x multiplies each "
            "method's distance from off (method_strengths). The bonus at 10x may not reach its "
            f"closed form ({closed_10x:.3f}) in this budget; its row says where it got.",
  )

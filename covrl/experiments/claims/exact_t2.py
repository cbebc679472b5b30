"""THEORY.md "T2/T3 in a network, exactly", T2.tf: both forms of the entropy bonus reach their
closed-form stationary points in a transformer trained with exact expected updates.

Form a puts the entropy of the response distribution in the return (reach differentiated), whose
stationary point is softmax(R / alpha); form b is verl's per-token bonus (reach weights held
fixed), whose stationary points solve pi_s = softmax(Q^pi(s, .) / alpha) with the unregularised
Q^pi (proofs' T2.6 correction). Both are trained side by side from one random network
(`exact_runs.continuation`) and compared in float64 with `exact_references`. Thresholds, fixed
before the first run: KL_TOL, FORMS_APART and T24_TOL are the issue's; GAP_TOL is ours.
"""

from __future__ import annotations

import jax
import numpy as np

from covrl.experiments.claims import _util as u
from covrl.experiments.claims import exact_references as ref
from covrl.experiments.claims import exact_runs as runs_
from covrl.experiments.claims.registry import Measurement, register
from covrl.transformer import tree

KL_TOL = 1e-4        # mean per-prompt response-level KL(pi_ref || pi_theta), nats
GAP_TOL = 1e-3       # |trained gap - closed-form gap|, mean over prompts (ours)
FORMS_APART = 1e-2   # KL between the two forms' fixed points at alpha = 0.1
T24_TOL = 1e-10      # T2.4 along trajectories, float64


def _plot_forms(m: Measurement, fig) -> None:
  ax1, ax2 = fig.subplots(1, 2)
  grid = np.asarray(m.series["alpha_grid"])
  ax1.plot(grid, m.series["soft_gap_curve"], color="C0", label="softmax(R/alpha) (form a, closed)")
  ax1.plot(grid, m.series["myopic_gap_curve"], color="C1",
           label="verl's bonus fixed point (form b)")
  alphas = m.measured["alphas"]
  ax1.plot(alphas, m.measured["gap_a"], "o", color="C0", label="network, form a")
  ax1.plot(alphas, m.measured["gap_b"], "s", color="C1", label="network, form b")
  ax1.set_xscale("log")
  ax1.set_yscale("log")
  ax1.set_xlabel("bonus coefficient alpha")
  ax1.set_ylabel("optimality gap r* - E[R] (mean over prompts)")
  ax1.legend(fontsize=6)
  curves = m.series["kl_curves"]
  for form, color in (("a", "C0"), ("b", "C1")):
    y = np.concatenate(curves[form])
    ax2.semilogy(np.maximum(y, 1e-12), color=color, label=f"form {form}: KL to its fixed point")
  step = len(curves["a"][0])
  for i, alpha in enumerate(alphas):
    ax2.axvline(i * step, color="0.8", lw=0.5)
    ax2.text(i * step, 1e-11, f"{alpha:g}", fontsize=6)
  ax2.axhline(KL_TOL, color="k", ls=":", lw=0.8, label="threshold 1e-4")
  ax2.set_xlabel("exact update (stages: alpha lowered geometrically)")
  ax2.set_ylabel("response-level KL(pi_alpha || pi_theta)")
  ax2.legend(fontsize=6)


@register("T2.tf", "In a network: both forms of the entropy bonus reach their closed-form "
          "stationary points (softmax(R/alpha); verl's pi_s = softmax(Q^pi/alpha)), which differ; "
          "T2.4 holds along trajectories", group="exact", proof=u.proof("T2.tf"),
          plot=_plot_forms)
def check_bonus_forms(size: str, key: jax.Array) -> Measurement:
  s = runs_.setting(size)
  task = s.task
  v, t, rewards = task.num_tokens, task.response_length, task.rewards
  runs = runs_.continuation(size, u.seed_of(key))
  grid = [st for st in runs["stages"] if st["alpha"] in runs_.ALPHAS]
  rows, t24 = [], []
  for stage in grid:
    alpha = stage["alpha"]
    soft, myopic = ref.references(task, alpha)
    lp = [tree.response_log_probs(task, nodes) for nodes in stage["nodes"]]
    soft_nodes = ref.soft_bellman(rewards, alpha, v, t)
    rows.append({
        "alpha": alpha,
        "kl_a": float(ref.kl(soft, lp[0]).mean()), "kl_b": float(ref.kl(myopic, lp[1]).mean()),
        "gap_a": float(ref.gaps(rewards, lp[0]).mean()),
        "gap_b": float(ref.gaps(rewards, lp[1]).mean()),
        "closed_a": float(ref.gaps(rewards, soft).mean()),
        "closed_b": float(ref.gaps(rewards, myopic).mean()),
        "t23_bound": float(ref.t23_bound(rewards, alpha).mean()),
        "bellman_vs_softmax": float(np.max(np.abs(
            ref.responses_from_nodes(soft_nodes, v, t) - soft))),
        "forms_apart": float(ref.kl(soft, myopic).mean()),
        "b_vs_soft": float(ref.kl(soft, lp[1]).mean())})
    for nodes, logp in zip(stage["nodes"], lp):  # T2.4 on the trained networks
      lhs = ref.soft_objective(rewards, soft, alpha) - ref.soft_objective(rewards, logp, alpha)
      rhs = alpha * ref.trajectory_kl(list(nodes), soft_nodes, v)
      t24.append(float(np.max(np.abs(lhs - rhs))))
  init_lp = tree.response_log_probs(task, runs["init_nodes"])
  for alpha in runs_.ALPHAS:  # and on the untrained network
    lhs = ref.soft_objective(rewards, ref.soft_optimum(rewards, alpha), alpha) - ref.soft_objective(
        rewards, init_lp, alpha)
    rhs = alpha * ref.trajectory_kl(list(runs["init_nodes"]),
                                    ref.soft_bellman(rewards, alpha, v, t), v)
    t24.append(float(np.max(np.abs(lhs - rhs))))
  scratch = {}
  for alpha, nodes in runs["scratch"].items():
    soft, myopic = ref.references(task, alpha)
    lp = [tree.response_log_probs(task, n) for n in nodes]
    scratch[f"{alpha:g}"] = {"kl_a": float(ref.kl(soft, lp[0]).mean()),
                             "kl_b": float(ref.kl(myopic, lp[1]).mean())}
  at01 = next(r for r in rows if r["alpha"] == 0.1)
  reached = all(r["kl_a"] <= KL_TOL and r["kl_b"] <= KL_TOL for r in rows)
  gap_ok = all(abs(r["gap_a"] - r["closed_a"]) <= GAP_TOL and
               abs(r["gap_b"] - r["closed_b"]) <= GAP_TOL for r in rows)
  bounded = all(0 < r["closed_a"] <= r["t23_bound"] * (1 + 1e-12) for r in rows)
  apart = at01["forms_apart"] >= FORMS_APART and at01["b_vs_soft"] >= FORMS_APART
  identity = max(t24) <= T24_TOL
  passed = bool(reached and gap_ok and bounded and apart and identity)
  curve = np.geomspace(min(runs_.ALPHAS) / 2, max(runs_.ALPHAS) * 2, 40)
  return Measurement(
      passed,
      {"alphas": [r["alpha"] for r in rows], "rows": rows,
       "gap_a": [r["gap_a"] for r in rows], "gap_b": [r["gap_b"] for r in rows],
       "max_kl": max(max(r["kl_a"], r["kl_b"]) for r in rows),
       "forms_apart_at_0.1": at01["forms_apart"], "network_b_vs_soft_at_0.1": at01["b_vs_soft"],
       "t24_max_error": max(t24), "from_random_start": scratch,
       "steps_per_alpha": runs["steps_per_stage"]},
      {"kl": f"<= {KL_TOL:g} nats per alpha and form (mean over prompts)",
       "gap": f"|trained - closed form| <= {GAP_TOL:g}; the soft gap within T2.3's bound",
       "forms_apart": f">= {FORMS_APART:g} at alpha 0.1 (fixed points and the trained form b)",
       "t24": f"max error <= {T24_TOL:g} (float64; it tests the enumeration)"},
      "KL to the fixed point, form a / b: " + ", ".join(
          f"{r['alpha']:g}: {r['kl_a']:.1e} / {r['kl_b']:.1e}" for r in rows) +
      "; gaps (trained vs closed, a | b): " + ", ".join(
          f"{r['gap_a']:.5f} vs {r['closed_a']:.5f} | {r['gap_b']:.5f} vs {r['closed_b']:.5f}"
          for r in rows) +
      f"; forms apart at 0.1: KL {at01['forms_apart']:.3f} (network b vs soft "
      f"{at01['b_vs_soft']:.3f}); T2.4 error {max(t24):.1e}" + (
          "; from a random start: " + ", ".join(
              f"{k}: {v['kl_a']:.1e} / {v['kl_b']:.1e}" for k, v in scratch.items())
          if scratch else ""),
      series={"alpha_grid": curve,
              "soft_gap_curve": [float(ref.gaps(rewards, ref.soft_optimum(rewards, a)).mean())
                                 for a in curve],
              "myopic_gap_curve": [float(ref.gaps(rewards, ref.references(task, a)[1]).mean())
                                   for a in curve],
              "kl_curves": {"a": [st["kl_curve"][0, :, 0] for st in grid],
                            "b": [st["kl_curve"][1, :, 1] for st in grid]}},
      notes=f"Adam (peak 2e-3, warm-up 150, cosine) for {runs['steps_per_stage']} exact updates "
            "per alpha; each alpha after the first starts from the previous one's network with "
            "alpha lowered geometrically over the first half of its stage (continuation): from "
            "a random start the small alphas are not reached in that budget (reported under "
            "from_random_start). Form a is the entropy of the response distribution in the "
            "return (reach differentiated), form b verl's per-token bonus (reach held fixed); "
            "T2.4's identity is an algebraic fact about any policy on the tree, so its check "
            "tests the enumeration (node conditionals, reach probabilities, response sums).",
  )

"""Checks of Cui et al.'s findings in the transformer lab (T4): entropy collapse, the
reward-entropy law, and every control method compared over seeds.

The lab setting of `covrl.transformer.lab` at the claim's size: a small decoder-only transformer,
warm-started by supervised learning on noisy demonstrations of a sorting task, then trained with
GRPO. T4.1 and T4.2 read the uncontrolled runs over several seeds; T4.3 compares every control
method over the same seeds (computed once per size and seed, then reused: its uncontrolled runs
are the same runs). At its full size T4.3 alone takes longer than the default job's budget on two
CPU cores, so it runs at "test", "fast" and `covrl reproduce --size long`, not at the default.

T4 is empirical. Its pass criteria are fixed here, before looking at the numbers, from what the
paper reports; where the numbers differ from the paper, the notes say so.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from covrl.experiments.claims import _util as u
from covrl.experiments.claims.registry import Measurement, register
from covrl.transformer import grpo, lab


def claim_comparison(size: str, seed: int = 0) -> lab.Comparison:
  """The comparison T4.1-T4.3 measure at `size` in `covrl reproduce --seed seed`."""
  return lab_comparison(size, u.seed_of(jax.random.key(seed)))


_COMPARISONS: dict[tuple[str, int, bool], lab.Comparison] = {}


def lab_comparison(size: str, seed: int) -> lab.Comparison:
  """Every lab method over the lab's seeds at a size (cached: T4.3 and notebook 04 read it)."""
  return _comparison(size, seed, every_method=True)


def uncontrolled(size: str, seed: int) -> lab.Comparison:
  """The uncontrolled runs ("none") over the lab's seeds, which is all T4.1 and T4.2 read: the
  method comparison's own when it has run, else those runs alone. A seed's run depends only on
  its warm start and key, not on the other methods compared, so both are the same runs."""
  return _COMPARISONS.get((size, seed, True)) or _comparison(size, seed, every_method=False)


def _comparison(size: str, seed: int, every_method: bool) -> lab.Comparison:
  key = (size, seed, every_method)
  if key not in _COMPARISONS:
    trainer = grpo.get_trainer(lab.lab_config(size))
    methods = lab.lab_methods(trainer.config.num_steps)
    _COMPARISONS[key] = lab.compare(trainer.config, methods if every_method else methods[:1],
                                    lab.lab_num_seeds(size), jax.random.key(seed),
                                    trainer=trainer)
  return _COMPARISONS[key]


def _plot_curves(m: Measurement, fig) -> None:
  ax1, ax2 = fig.subplots(1, 2)
  for label, curve in m.series["entropy"].items():
    ax1.plot(curve, label=u.display_label(label))
  for label, curve in m.series["reward"].items():
    ax2.plot(curve, label=u.display_label(label))
  ax1.set_xlabel("GRPO step")
  ax1.set_ylabel("entropy (nats / token)")
  ax2.set_xlabel("GRPO step")
  ax2.set_ylabel("reward")
  ax1.legend(fontsize=7)


@register("T4.1", "Entropy collapses early without control (Cui et al.: 73% of the drop in the "
          "first 1/12 of training)", group="transformer", proof="",
          plot=_plot_curves, kind="empirical")
def check_entropy_collapse(size: str, key: jax.Array) -> Measurement:
  comp = uncontrolled(size, u.seed_of(key))
  h = comp.metrics["none"]["entropy"].mean(0)
  r = comp.metrics["none"]["reward"].mean(0)
  steps = h.size
  early = max(1, steps // 12)
  h0, h_end = float(h[0]), float(comp.final("none", "entropy").mean())
  r0, r_end = float(r[0]), float(comp.final("none", "reward").mean())
  drop = (h0 - h_end) / h0
  early_drop = (h0 - float(h[early])) / (h0 - h_end) if h0 != h_end else float("nan")
  early_gain = (float(r[early]) - r0) / (r_end - r0) if r_end != r0 else float("nan")
  passed = bool(drop >= 0.5)
  return Measurement(
      passed,
      {"initial_entropy": h0, "final_entropy": h_end, "entropy_drop_frac": drop,
       "early_drop_frac": early_drop, "early_gain_frac": early_gain, "early_steps": early,
       "steps": steps, "seeds": int(comp.metrics["none"]["entropy"].shape[0])},
      {"entropy_drop_frac": ">= 0.5 (pass criterion)", "early_drop_frac": "0.73 (Cui et al.)",
       "early_gain_frac": "0.76 (Cui et al.)"},
      f"without control the entropy falls from {h0:.3f} to {h_end:.3f} ({drop:.0%}); "
      f"{early_drop:.0%} of the drop and {early_gain:.0%} of the reward gain come in the first "
      f"{early}/{steps} steps (Cui et al.: 73% and 76% in 200/2400)",
      series={"entropy": {"none": h}, "reward": {"none": r}},
      notes=_early_note(early_drop),
  )


def _early_note(early_drop: float) -> str:
  if early_drop >= 0.73:
    return "The collapse is at least as front-loaded as in Cui et al."
  return ("The collapse is less front-loaded than in Cui et al. (who start from a larger, "
          "better-trained model at a lower learning rate relative to its entropy); the shape, a "
          "fast fall and a low plateau, is the same.")


def _plot_law(m: Measurement, fig) -> None:
  ax = fig.subplots()
  s = m.series
  ax.scatter(s["entropy"], s["reward"], s=6, alpha=0.5, label="steps (all seeds)")
  h = np.linspace(np.min(s["entropy"]), np.max(s["entropy"]), 100)
  ax.plot(h, -s["a"] * np.exp(h) + s["b"], "k-", label=f"R = -a e^H + b, R^2 = {s['r2']:.3f}")
  ax.set_xlabel("entropy H")
  ax.set_ylabel("reward R")
  ax.legend(fontsize=8)


@register("T4.2", "Reward follows R = -a exp(H) + b during uncontrolled training (Cui et al.)",
          group="transformer", proof="", plot=_plot_law, kind="empirical")
def check_reward_entropy_law(size: str, key: jax.Array) -> Measurement:
  comp = uncontrolled(size, u.seed_of(key))
  h = comp.metrics["none"]["entropy"].reshape(-1).astype(np.float64)
  r = comp.metrics["none"]["reward"].reshape(-1).astype(np.float64)
  (slope, b), r2 = _linear_fit(np.exp(h), r)
  (_, _), r2_linear = _linear_fit(h, r)
  a = -slope
  passed = bool(a > 0 and r2 >= 0.8)
  return Measurement(
      passed,
      {"a": a, "b": b, "r2": r2, "r2_linear_in_H": r2_linear, "points": int(h.size),
       "predicted_reward_at_zero_entropy": b - a},
      {"a": "> 0", "r2": ">= 0.8 (pass criterion)"},
      f"R = -{a:.3f} exp(H) + {b:.3f} fits the uncontrolled run with R^2 = {r2:.3f} "
      f"(a line in H: {r2_linear:.3f}); at H = 0 it predicts R = {b - a:.3f}",
      series={"entropy": h, "reward": r, "a": a, "b": b, "r2": r2},
      notes="Fitted by least squares on every step of every uncontrolled seed (the rollout's mean "
            "token entropy and mean reward). Cui et al. report the same form across model "
            "families; here the reward ceiling is 1, so b - a is the extrapolated reward of a "
            "fully collapsed policy." + (
                f" A straight line in H fits as well or better here (R^2 {r2_linear:.3f}): over "
                f"the entropies seen (H <= {h.max():.2f}) exp(H) is close to linear, so the data "
                "support the trade-off more than the exponential form itself."
                if r2_linear >= r2 else ""),
  )


def _linear_fit(x, y) -> tuple[tuple[float, float], float]:
  design = np.stack([x, np.ones_like(x)], 1)
  coef, *_ = np.linalg.lstsq(design, y, rcond=None)
  resid = y - design @ coef
  r2 = 1.0 - float(np.sum(resid**2) / np.sum((y - y.mean()) ** 2))
  return (float(coef[0]), float(coef[1])), r2


def _plot_comparison(m: Measurement, fig) -> None:
  _plot_curves(m, fig)


@register("T4.3", "Clip-Cov and KL-Cov keep entropy above the uncontrolled plateau: all methods "
          "over seeds", group="transformer", proof="", plot=_plot_comparison, kind="empirical",
          not_at=("full",))
def check_method_comparison(size: str, key: jax.Array) -> Measurement:
  comp = lab_comparison(size, u.seed_of(key))
  rows = comp.table()
  by = {row["method"]: row for row in rows}
  finite = all(np.isfinite(row["final_reward"]) and np.isfinite(row["final_entropy"])
               for row in rows)
  # Seed-paired differences against the uncontrolled run (each seed shares its warm start and
  # its RL key across methods), with one-sided 95% t lower bounds.
  paired = {name: comp.paired(name, "entropy") for name in comp.labels
            if name != "none"}
  reward_paired = {name: comp.paired(name, "reward") for name in comp.labels if name != "none"}
  above = {name: bool(paired[name][1] > 0) for name in ("clip_cov", "kl_cov")}
  passed = bool(finite and all(above.values()))
  plateau = by["none"]["final_entropy"]
  best = max(rows, key=lambda row: row["final_reward"])
  return Measurement(
      passed,
      {"table": rows, "seeds": lab.lab_num_seeds(size), "steps": comp.config.num_steps,
       "entropy_minus_none": {k: v[0] for k, v in paired.items()},
       "entropy_minus_none_lower95": {k: v[1] for k, v in paired.items()},
       "reward_minus_none": {k: v[0] for k, v in reward_paired.items()},
       "reward_minus_none_lower95": {k: v[1] for k, v in reward_paired.items()},
       "compile_seconds": comp.compile_seconds, "warm_start_seconds": comp.warm_start_seconds},
      {"entropy_minus_none_lower95": "> 0 for clip_cov and kl_cov (pass criterion: final "
                                     "entropy above the uncontrolled plateau, resolved over "
                                     "seeds)",
       "final_reward": "Cui et al.: Clip-Cov / KL-Cov improve accuracy (Qwen2.5-32B 45.8 -> "
                       "50.3 / 52.2); reported, not a criterion"},
      f"final entropy minus the uncontrolled {plateau:.4f}: clip_cov "
      f"{paired['clip_cov'][0]:+.4f} (95% lower bound {paired['clip_cov'][1]:+.4f}), kl_cov "
      f"{paired['kl_cov'][0]:+.4f} ({paired['kl_cov'][1]:+.4f}); best final reward: "
      f"{best['method']} {best['final_reward']:.3f} (none {by['none']['final_reward']:.3f})",
      series={"entropy": {k: v["entropy"].mean(0) for k, v in comp.metrics.items()},
              "reward": {k: v["reward"].mean(0) for k, v in comp.metrics.items()},
              "table": rows},
      notes=_comparison_note(by, paired, lab.lab_num_seeds(size)),
  )


def _comparison_note(by: dict[str, dict[str, Any]], paired: dict[str, tuple[float, float]],
                     seeds: int) -> str:
  resolved = [name for name in ("clip_cov", "kl_cov") if paired[name][1] > 0]
  unresolved = [name for name in ("clip_cov", "kl_cov") if paired[name][1] <= 0]
  parts = []
  if resolved:
    parts.append(f"As in Cui et al., {' and '.join(resolved)} end with more entropy than the "
                 f"uncontrolled run, resolved over {seeds} paired seeds.")
  if unresolved:
    parts.append(f"Unlike Cui et al., {' and '.join(unresolved)} do not end with measurably more "
                 f"entropy than the uncontrolled run here: the paired differences are within "
                 f"seed noise over {seeds} seeds.")
  parts.append(
      "Likely reasons, not tested here: with mini-batches of about a hundred tokens the paper's "
      "ratios act on the minimum of one token per mini-batch (touched: " + ", ".join(
          f"{name} {by[name]['touched_frac']:.2%}" for name in ("clip_cov", "kl_cov")) +
      "), and the runs are hundreds of steps, not thousands. A task this small is nearly solved "
      "by every method, so the accuracy gains they report need not appear either (final reward: "
      + ", ".join(f"{name} {by[name]['final_reward']:.3f}" for name in by) + ").")
  return " ".join(parts)

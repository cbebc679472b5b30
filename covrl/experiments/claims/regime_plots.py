"""Figures of the regime claims (covrl.experiments.claims.regime): dose-response, frontier, and
entropy and reward curves with their spread over seeds."""

from __future__ import annotations

import numpy as np

from covrl.experiments.claims.registry import Measurement

_COLORS = {"entropy": "C1", "clip_cov": "C2", "kl_cov": "C3", "clip_higher": "C4",
           "forking": "C5", "entropy_adv": "C6", "w_reinforce": "C8", "steer": "C9", "none": "k"}


def _family(label: str) -> str:
  return label.split("@")[0].replace("_annealed", "")


def plot_dose(m: Measurement, fig) -> None:
  """Entropy kept and final reward against each method's dose (one curve per method).

  The dose is a row's distance from its method's "off" setting (`regime.dose`: the bonus's
  coefficient, the covariance ratios and KL coefficient, alpha; 1 - rho, 1 - lambda, 1 - w_min;
  clip-higher's upper clip minus 0.2), shown relative to the method's smallest dose so that
  every method starts at 1.
  """
  rows = m.series["dose"]["rows"]
  ax1, ax2 = fig.subplots(1, 2)
  for family in _COLORS:
    pts = sorted(((v["dose"], v) for k, v in rows.items()
                  if k.startswith(family + "@") and v.get("dose", 0) > 0), key=lambda p: p[0])
    if not pts:
      continue
    x = np.array([p[0] for p in pts])
    x = x / x[0]
    ax1.plot(x, [p[1]["kept"] for p in pts], "o-", color=_COLORS[family], label=family)
    ax2.errorbar(x, [p[1]["reward"] for p in pts], yerr=[p[1]["reward_ci95"] for p in pts],
                 fmt="o-", color=_COLORS[family], label=family, capsize=2)
  for ax in (ax1, ax2):
    ax.axhline(rows["none"]["kept" if ax is ax1 else "reward"], color="k", ls="--", lw=1,
               label="none")
    ax.set_xscale("log")
    ax.set_xlabel("dose / the method's smallest")
  ax1.set_yscale("log")
  ax1.set_ylabel("entropy kept (mean over training)")
  ax2.set_ylabel("final reward (95% interval over seeds)")
  ax1.legend(fontsize=6)


def plot_frontier(m: Measurement, fig) -> None:
  """Final reward and pass@k against entropy kept, one point per (method, strength)."""
  rows = m.series["rows"]
  ax1, ax2 = fig.subplots(1, 2)
  for label, v in rows.items():
    family = _family(label)
    marker = "s" if "annealed" in label else "o"
    for ax, name in ((ax1, "reward"), (ax2, "pass_at_k")):
      ax.scatter(v["kept"], v[name], color=_COLORS.get(family, "0.5"), marker=marker, s=18)
      ax.annotate(label.split("@")[-1] if "@" in label else label, (v["kept"], v[name]),
                  fontsize=5)
  for ax, name in ((ax1, "final reward"), (ax2, "final pass@k (k = group size)")):
    ax.set_xscale("log")
    ax.set_xlabel("entropy kept (mean over training)")
    ax.set_ylabel(name)
  present = {_family(label) for label in rows}
  for family, color in _COLORS.items():
    if family in present:
      ax1.scatter([], [], color=color, label=family)
  ax1.legend(fontsize=7)


def plot_curves(m: Measurement, fig) -> None:
  """Entropy and reward per step: mean over seeds, shaded between the seeds' min and max."""
  curves = m.series["dose"]["curves"]
  ax1, ax2 = fig.subplots(1, 2)
  for i, (label, c) in enumerate(curves.items()):
    for ax, name in ((ax1, "entropy"), (ax2, "reward")):
      v = np.asarray(c[name])
      t = np.arange(v.shape[1])
      ax.plot(t, v.mean(0), color=f"C{i}", label=label)
      ax.fill_between(t, v.min(0), v.max(0), color=f"C{i}", alpha=0.2)
  ax1.set_yscale("log")
  for ax, name in ((ax1, "entropy (nats / token)"), (ax2, "reward")):
    ax.set_xlabel("GRPO step")
    ax.set_ylabel(name)
  ax1.legend(fontsize=6)

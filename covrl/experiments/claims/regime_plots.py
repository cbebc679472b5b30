"""Figures of the regime claims (covrl.experiments.claims.regime): dose-response, frontier, and
entropy and reward curves with their spread over seeds.

The entropy bonus's runs are labelled "bonus" (`_util.display_label`). Rewards lie in [0, 1], so
an interval over few seeds is drawn cut at that range. In the frontier, runs whose entropy
exploded (final entropy above half of log V) are drawn at the axes' edge, so that they do not set
the scale every other point is read at.
"""

from __future__ import annotations

import numpy as np

from covrl.experiments.claims._util import display_label
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
    name = display_label(family)
    reward = np.array([p[1]["reward"] for p in pts])
    ax1.plot(x, [p[1]["kept"] for p in pts], "o-", color=_COLORS[family], label=name)
    ax2.errorbar(x, reward, yerr=_within_unit(reward, [p[1]["reward_ci95"] for p in pts]),
                 fmt="o-", color=_COLORS[family], label=name, capsize=2)
  for ax in (ax1, ax2):
    ax.axhline(rows["none"]["kept" if ax is ax1 else "reward"], color="k", ls="--", lw=1,
               label="none")
    ax.set_xscale("log")
    ax.set_xlabel("dose / the method's smallest")
  ax1.set_yscale("log")
  ax1.set_ylabel("entropy kept (mean over training)")
  ax2.set_ylabel("final reward (95% interval over seeds,\ncut at [0, 1])")
  ax1.legend(fontsize=6)


def _within_unit(values: np.ndarray, half_widths) -> np.ndarray:
  """[2, n] error bars of `values +- half_widths` cut at [0, 1] (the reward's range)."""
  half = np.asarray(half_widths, dtype=float)
  return np.stack([np.minimum(half, values), np.minimum(half, 1.0 - values)]).clip(0.0)


def plot_frontier(m: Measurement, fig) -> None:
  """Final reward and pass@k against entropy kept, one point per (method, strength); exploded
  runs sit at the right edge as open triangles, named in the legend."""
  rows = m.series["rows"]
  cut = m.series.get("explosion_entropy", float("inf"))
  exploded = {k for k, v in rows.items() if v["final_entropy"] > cut}
  calm = [v["kept"] for k, v in rows.items() if k not in exploded] or [1.0]
  lo, hi = min(calm) / 1.5, max(calm) * 1.5
  ax1, ax2 = fig.subplots(1, 2)
  for label, v in rows.items():
    family = _family(label)
    color = _COLORS.get(family, "0.5")
    for ax, name in ((ax1, "reward"), (ax2, "pass_at_k")):
      if label in exploded:
        ax.scatter(hi, v[name], marker=">", facecolors="none", edgecolors=color, s=30)
        continue
      ax.scatter(v["kept"], v[name], color=color, marker="s" if "annealed" in label else "o",
                 s=18)
      ax.annotate(label.split("@")[-1] if "@" in label else label, (v["kept"], v[name]),
                  fontsize=5)
  for ax, name in ((ax1, "final reward"), (ax2, "final pass@k (k = group size)")):
    ax.set_xscale("log")
    ax.set_xlim(lo, hi * 1.1)
    ax.set_xlabel("entropy kept (mean over training)")
    ax.set_ylabel(name)
  present = {_family(label) for label in rows}
  for family, color in _COLORS.items():
    if family in present:
      ax1.scatter([], [], color=color, label=display_label(family))
  if exploded:
    ax1.scatter([], [], marker=">", facecolors="none", edgecolors="k",
                label="exploded (off the axis): " + ", ".join(
                    display_label(k) for k in sorted(exploded)))
  ax1.legend(fontsize=6)


def _plot_curves(m: Measurement, fig, labels) -> None:
  """Entropy and reward per step of `labels`: mean over seeds, shaded between the seeds' min and
  max."""
  curves = m.series["dose"]["curves"]
  ax1, ax2 = fig.subplots(1, 2)
  for i, label in enumerate(k for k in labels if k in curves):
    for ax, name in ((ax1, "entropy"), (ax2, "reward")):
      v = np.asarray(curves[label][name])
      t = np.arange(v.shape[1])
      ax.plot(t, v.mean(0), color=f"C{i}", label=display_label(label))
      ax.fill_between(t, v.min(0), v.max(0), color=f"C{i}", alpha=0.2)
  ax1.set_yscale("log")
  for ax, name in ((ax1, "entropy (nats / token)"), (ax2, "reward")):
    ax.set_xlabel("GRPO step")
    ax.set_ylabel(name)
  ax1.legend(fontsize=6)


def plot_paper_curves(m: Measurement, fig) -> None:
  """T4.3.fork: no control and the paper's fixed settings (bonus, Clip-Cov, KL-Cov)."""
  curves = m.series["dose"]["curves"]
  _plot_curves(m, fig, [k for k in curves if "annealed" not in k])


def plot_annealed_curves(m: Measurement, fig) -> None:
  """T4.5.fork: no control and the annealed settings."""
  curves = m.series["dose"]["curves"]
  _plot_curves(m, fig, [k for k in curves if k == "none" or "annealed" in k])

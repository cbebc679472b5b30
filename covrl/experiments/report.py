"""The report of a `covrl reproduce` run: a table, report.md with figures, and results.json.

results.json holds every measured number (and the arrays behind the figures), what the theory
predicts, pass/fail per claim, and what produced them: the size, the seed, the versions of covrl,
JAX and Python, the platform and the device count. report.md is the same in prose, with one PNG
figure per claim that has a `plot` (drawn with matplotlib's object API, so no global backend is
touched).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

import covrl
from covrl.experiments.claims.registry import Claim, ClaimResult, jsonable


def environment(size: str, seed: int) -> dict[str, Any]:
  """What produced a run: versions, platform and devices, size and seed."""
  devices = jax.devices()
  return {
      "covrl_version": covrl.__version__,
      "jax_version": jax.__version__,
      "python_version": platform.python_version(),
      "platform": platform.platform(),
      "backend": jax.default_backend(),
      "device_count": len(devices),
      "device_kind": devices[0].device_kind if devices else "",
      "size": size,
      "seed": seed,
      "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
  }


def _short(value: Any) -> str:
  if isinstance(value, bool | np.bool_):
    return str(bool(value))
  if isinstance(value, float | np.floating):
    return f"{float(value):.4g}"
  if isinstance(value, int | np.integer):
    return str(int(value))
  if isinstance(value, dict):
    return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in list(value.items())[:3]) + \
        (", ..." if len(value) > 3 else "") + "}"
  if isinstance(value, list | tuple):
    return "[" + ", ".join(_short(v) for v in list(value)[:3]) + (", ..." if len(value) > 3
                                                                    else "") + "]"
  return str(value)


def brief(values: dict[str, Any], width: int = 48) -> str:
  """The first few `name=value` pairs of a dict, cut to `width` characters."""
  text = ", ".join(f"{k}={_short(v)}" for k, v in values.items())
  return text if len(text) <= width else text[: width - 3] + "..."


def table(results: Sequence[ClaimResult]) -> str:
  """A plain-text table: claim, measured, predicted or bound, pass/fail, seconds."""
  rows = [("claim", "measured", "predicted / bound", "result", "seconds")]
  for r in results:
    m = r.measurement
    rows.append((r.claim_id, brief(m.measured), brief(m.predicted), r.status,
                 f"{r.seconds:.1f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(5)]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  if any(cell.endswith("...") for row in rows for cell in row[1:3]):
    lines.append("(values cut to fit the terminal: every value is in report.md and "
                 "results.json)")
  return "\n".join(lines)


def _figure(claim: Claim, result: ClaimResult, path: str) -> str | None:
  """Draw the claim's figure into `path` (PNG); returns an error message if drawing failed."""
  from matplotlib.figure import Figure

  fig = Figure(figsize=(9, 3.6), layout="constrained")
  try:
    claim.plot(result.measurement, fig)
    # Wrapped to the figure's width: a long title set on one line is cut at both ends.
    fig.suptitle(textwrap.fill(f"{claim.claim_id}: {claim.title}", 110), fontsize=9)
    fig.savefig(path, dpi=90)
  except Exception as e:  # a broken figure must not lose the measurements
    return f"{type(e).__name__}: {e}"
  return None


def _markdown_values(values: dict[str, Any]) -> list[str]:
  lines = []
  for key, value in values.items():
    text = json.dumps(jsonable(value)) if not isinstance(value, str) else value
    if len(text) > 300:
      text = text[:297] + "..."
    lines.append(f"- `{key}`: {text}")
  return lines


def write(results: Sequence[ClaimResult], claims: dict[str, Claim], out_dir: str, *,
          size: str, seed: int) -> dict[str, Any]:
  """Write out_dir/report.md, out_dir/results.json and out_dir/figures/*.png.

  Args:
    results: the claims' results, in order.
    claims: the registered claims by id (for titles, proofs and plots).
    out_dir: the folder (created if missing).
    size, seed: what the run used.

  Returns:
    The JSON document written to results.json.
  """
  os.makedirs(os.path.join(out_dir, "figures"), exist_ok=True)
  env = environment(size, seed)
  entries, figure_errors = [], {}
  for r in results:
    claim = claims[r.claim_id]
    entry = r.to_json()
    entry["proof"] = claim.proof
    entry["group"] = claim.group
    entry["series"] = jsonable(r.measurement.series)
    if claim.plot is not None and not r.not_run:
      name = f"figures/{r.claim_id}.png"
      error = _figure(claim, r, os.path.join(out_dir, name))
      if error is None:
        entry["figure"] = name
      else:
        figure_errors[r.claim_id] = error
        entry["figure_error"] = error
    entries.append(entry)
  passed = sum(r.passed for r in results)
  not_run = [r for r in results if r.not_run]
  ran = [r for r in results if not r.not_run]
  theorems = [r for r in ran if r.kind == "theorem"]
  empirical = [r for r in ran if r.kind == "empirical"]
  targets = [r for r in ran if r.kind == "target"]
  errors = sum(bool(r.error) for r in results)
  parts = [f"{sum(r.passed for r in theorems)}/{len(theorems)} theorems confirmed"]
  if empirical:
    parts.append(f"{sum(r.passed for r in empirical)}/{len(empirical)} empirical findings "
                 "reproduced")
  if targets:
    parts.append(f"{sum(r.passed for r in targets)}/{len(targets)} targets met")
  if errors:
    parts.append(f"{errors} checks raised")
  if not_run:
    parts.append(f"{len(not_run)} not run at this size (--size long)")
  headline = ", ".join(parts)
  doc = {**env, "passed": not any(r.failed for r in results), "num_passed": passed,
         "num_claims": len(results), "num_theorems": len(theorems),
         "num_theorems_confirmed": sum(r.passed for r in theorems),
         "num_empirical": len(empirical),
         "num_empirical_reproduced": sum(r.passed for r in empirical),
         "num_targets": len(targets), "num_targets_met": sum(r.passed for r in targets),
         "num_errors": errors, "num_not_run": len(not_run),
         "headline": headline, "claims": entries}
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(jsonable(doc), f, indent=1, allow_nan=False)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(_markdown(results, entries, env, headline))
  return doc


def _markdown(results, entries, env, headline) -> str:
  lines = [
      "# covrl reproduce: the theory, measured",
      "",
      f"{headline} at size `{env['size']}` (seed "
      f"{env['seed']}). covrl {env['covrl_version']}, JAX {env['jax_version']}, Python "
      f"{env['python_version']}, {env['backend']} x {env['device_count']} "
      f"({env['platform']}), {env['created']}.",
      "",
      "| claim | result | seconds | what was measured |",
      "|---|---|---|---|",
  ]
  for r in results:
    summary = r.measurement.summary.replace("|", "\\|")
    status = f"**{r.status}**" if r.failed or not r.passed else r.status
    lines.append(f"| [{r.claim_id}](#{r.claim_id}) | {status} | {r.seconds:.1f} | {summary} |")
  for r, entry in zip(results, entries):
    m = r.measurement
    lines += ["", f'<a id="{r.claim_id}"></a>', "", f"### {r.claim_id} — {r.title}", "",
              f"**{r.status.capitalize()}** ({r.kind}) in {r.seconds:.1f} s. "
              f"{m.summary}", ""]
    if entry.get("proof"):
      lines += [f"Proof: [{entry['proof']}]({entry['proof']})", ""]
    if r.not_run:
      lines += [m.notes, ""]
      continue
    if "figure" in entry:
      lines += [f"![{r.claim_id}]({entry['figure']})", ""]
    elif "figure_error" in entry:
      lines += [f"(figure not drawn: {entry['figure_error']})", ""]
    lines += ["Measured:", "", *_markdown_values(m.measured), "", "Predicted / bound:", "",
              *_markdown_values(m.predicted), ""]
    if m.notes:
      lines += [f"Notes: {m.notes}", ""]
  return "\n".join(lines) + "\n"

"""covrl benchmarks: one command, a table on stdout and every number in a JSON file.

  python -m benchmarks.run [--quick] [--out benchmarks/results.json] [--parts ...]

Parts (all by default, in this order):
  parity       covrl's verl-compatible losses give verl 0.9's loss and gradient on the same
               inputs (benchmarks/parity.py); any disagreement stops the run with exit code 2;
  losses       forward + backward of PPO, Clip-Cov, KL-Cov and the entropy bonus, covrl (jitted)
               against verl (PyTorch, CPU), interleaved, with a memcpy of the same bytes;
  sharded      global-exact against local selection on 8 simulated devices (a subprocess);
  sweep        the tabular exact-PG-with-bonus sweep, covrl against vectorised NumPy;
  transformer  tokens per second of the transformer lab's rollout and update.

--quick: fewer rounds, the entropy bonus and parity at the small size only, and the large sweep
cut to 1,000 steps (about two minutes on 2 cores); the default is the full run behind the
README table. Needs the benchmark extras: `bash benchmarks/install.sh VENV`.

Timings are medians over interleaved rounds, with the interquartile range (± half of it, as a
percentage of the median, in the table) and min/max in the JSON. Targets are reported as
figures, met or not; they are never asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

PARTS = ("parity", "losses", "sharded", "sweep", "transformer")
POLICY_SPEEDUP_TARGET = 5.0
SELECTION_COST_TARGET = 1.25
GLOBAL_LOCAL_TARGET = 1.5
BANDWIDTH_TARGET = 1 / 3
SWEEP_TARGETS = {"small": 10.0, "large": 3.0}


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _config(quick: bool) -> dict[str, Any]:
  from benchmarks import sweep

  if quick:
    return {
        "parity": {"batch": 16, "time": 256, "agg_mode_losses": ("ppo",)},
        "losses": {"sizes": ("small", "large"), "rounds": 7, "entropy_rounds": 3,
                   "entropy_sizes": ("small",)},
        "bandwidth_bytes": 1 << 26,
        "sharded": {"sizes": ("small", "large"), "rounds": 7},
        "sweep": {"sizes": {"small": sweep.SIZES["small"], "large": sweep.QUICK_LARGE},
                  "repeats": 3},
        "transformer": {"size": "small", "rounds": 3},
    }
  return {
      "parity": {"batch": 64, "time": 1024},
      "losses": {"sizes": ("small", "large"), "rounds": 31, "entropy_rounds": 7,
                 "entropy_sizes": ("small", "large")},
      "bandwidth_bytes": 1 << 28,
      "sharded": {"sizes": ("small", "large"), "rounds": 21},
      "sweep": {"sizes": dict(sweep.SIZES), "repeats": 3},
      "transformer": {"size": "full", "rounds": 5},
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description="covrl benchmarks (see benchmarks/run.py).")
  p.add_argument("--quick", action="store_true", help="short run (about two minutes)")
  p.add_argument("--out", default="benchmarks/results.json", help="JSON output path")
  p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--render", metavar="JSON", help="print the tables of a saved run and exit")
  args = p.parse_args(argv)
  if args.render:
    with open(args.render) as f:
      print(render(json.load(f)))
    return 0
  parts = [x for x in args.parts.split(",") if x]
  unknown = set(parts) - set(PARTS)
  if unknown:
    p.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")

  from benchmarks import common
  from benchmarks import contestants as C

  cfg = _config(args.quick)
  report: dict[str, Any] = {"command": " ".join([os.path.basename(sys.executable), "-m",
                                                  "benchmarks.run", *(argv or sys.argv[1:])]),
                            "quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                            "machine": common.machine_info(), "config": _jsonable(cfg)}
  start = time.perf_counter()
  if {"parity", "losses"} & set(parts):
    ok, why = C.verl_available()
    if not ok:
      _log(f"error: the parity and loss parts need torch and verl ({why}).\n"
           "Install them with: bash benchmarks/install.sh VENV  (or run --parts sharded,sweep)")
      return 3
    report["machine"]["versions"].update(C.verl_versions())

  if "parity" in parts:
    from benchmarks import parity

    _log("parity: covrl against verl on the same inputs")
    try:
      cases = parity.check(**cfg["parity"], seed=args.seed)
    except parity.ParityError as e:
      _log(f"PARITY FAILED, no timing is reported:\n{e}")
      report["parity"] = {"passed": False, "error": str(e)}
      _write(args.out, report)
      return 2
    report["parity"] = {"passed": True, "size": [cfg["parity"]["batch"], cfg["parity"]["time"]],
                        "cases": [c.__dict__ for c in cases]}
    worst = max(c.loss_error / c.loss_tolerance for c in cases if c.expect_equal)
    _log(f"  {len(cases)} cases as expected (worst loss error {worst:.1e} of its tolerance)")

  if "losses" in parts:
    from benchmarks import losses

    _log("copy bandwidth")
    report["bandwidth"] = common.copy_bandwidth(num_bytes=cfg["bandwidth_bytes"])
    _log("losses: covrl against verl")
    report["losses"] = losses.run(**cfg["losses"], seed=args.seed, log=_log)
    for r in report["losses"]["rows"]:  # against the large-array (DRAM) copy bandwidth too
      at_bandwidth = r["bytes_moved"] / report["bandwidth"]["bytes_per_s"]
      r["time_at_copy_bandwidth_s"] = at_bandwidth
      r["fraction_of_copy_bandwidth"] = at_bandwidth / r["covrl"]["median"]
  if "sharded" in parts:
    from benchmarks import sharded

    _log("sharded: global against local selection on 8 simulated devices")
    report["sharded"] = sharded.run(**cfg["sharded"], seed=args.seed)
  if "sweep" in parts:
    from benchmarks import sweep

    _log("sweep: tabular exact PG with entropy bonus, covrl against NumPy")
    report["sweep"] = sweep.run(**cfg["sweep"], seed=args.seed, log=_log)
  if "transformer" in parts:
    from benchmarks import transformer

    _log("transformer")
    report["transformer"] = transformer.run(**cfg["transformer"], seed=args.seed, log=_log)

  report["targets"] = targets(report)
  report["elapsed_s"] = time.perf_counter() - start
  _write(args.out, report)
  print(render(report))
  _log(f"wrote {args.out} ({report['elapsed_s']:.0f} s)")
  return 0


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
  """Every target as (what, measured, target, met)."""
  out = []

  def add(what, measured, target, higher_is_better=True):
    met = measured >= target if higher_is_better else measured <= target
    out.append({"target": what, "measured": measured, "threshold": target,
                "direction": ">=" if higher_is_better else "<=", "met": bool(met)})

  for r in report.get("losses", {}).get("rows", []):
    add(f"covrl/verl throughput, {r['loss']} {r['size']}", r["speedup_vs_verl"],
        POLICY_SPEEDUP_TARGET)
  for r in report.get("losses", {}).get("rows", []):
    if r["loss"] in ("clip_cov", "kl_cov"):
      add(f"cost vs PPO in covrl, {r['loss']} {r['size']}", r["cost_vs_ppo"],
          SELECTION_COST_TARGET, higher_is_better=False)
  for r in report.get("sharded", {}).get("rows", []):
    add(f"global/local selection, 8 devices, {r['loss']} {r['size']}", r["global_over_local"],
        GLOBAL_LOCAL_TARGET, higher_is_better=False)
  for r in report.get("losses", {}).get("rows", []):
    add(f"fraction of copy-bandwidth limit, {r['loss']} {r['size']}",
        r["fraction_of_copy_bandwidth"], BANDWIDTH_TARGET)
  for r in report.get("sweep", {}).get("rows", []):
    add(f"covrl/NumPy sweep, {r['size']} {r['instances']}x{r['arms']}x{r['steps']}",
        r["speedup_vs_numpy"], SWEEP_TARGETS.get(r["size"], math.nan))
  return out


def render(report: dict[str, Any]) -> str:
  """The human-readable tables (Markdown)."""
  from benchmarks.common import fmt_time, table

  m = report["machine"]
  v = m["versions"]
  lines = [
      f"# covrl benchmarks{' (--quick)' if report['quick'] else ''}",
      "",
      f"machine: {m['processor']}, {m['affinity_cpus']} cores; jax {v.get('jax')}, "
      f"numpy {v.get('numpy')}, torch {v.get('torch', '-')} ({v.get('torch_threads', '-')} "
      f"threads), verl {v.get('verl', '-')}; load average at start "
      f"{', '.join(f'{x:.1f}' for x in m['load_average'] or ())}",
  ]
  if "parity" in report:
    par = report["parity"]
    lines += ["", f"parity with verl: {'passed' if par['passed'] else 'FAILED'}"
              + (f", {len(par['cases'])} cases at {par['size'][0]}x{par['size'][1]}"
                 if par["passed"] else "")]
  if "losses" in report:
    bw = report["bandwidth"]
    lines += ["", f"## Losses, forward + backward, float32 (copy bandwidth, "
              f"{bw['array_bytes'] >> 20} MiB arrays: "
              + ", ".join(f"{k} {x['bytes_per_s'] / 1e9:.1f} GB/s"
                          for k, x in bw["methods"].items()) + ")", ""]
    rows = []
    for r in report["losses"]["rows"]:
      size = "x".join(map(str, report["losses"]["sizes"][r["size"]]))
      if "vocab" in r:
        size += f"x{r['vocab']}"
      rows.append([
          r["loss"], size, _t(r["covrl"]), _t(r["verl"]), f"{r['speedup_vs_verl']:.1f}x",
          _t(r["covrl_all_metrics"]), f"{r['speedup_all_metrics_vs_verl']:.1f}x",
          f"{r['verl']['min'] / r['covrl']['min']:.1f}x",
          f"{r['covrl_tokens_per_s'] / 1e6:.1f}M", f"{r['verl_tokens_per_s'] / 1e6:.2f}M",
          "-" if not r.get("covrl_alone") else _t(r["covrl_alone"]),
          "-" if r["cost_vs_ppo"] is None else f"{r['cost_vs_ppo']:.2f}x",
          f"{r['bytes_moved'] / 2**20:.1f} MiB", fmt_time(r["time_at_copy_bandwidth_s"]),
          f"{r['fraction_of_copy_bandwidth']:.2f}", _t(r["memcpy"]),
          f"{r['fraction_of_memcpy']:.2f}",
      ])
    lines.append(table(["loss", "B x T (x V)", "covrl", "verl", "covrl/verl",
                        "covrl, all metrics", "all/verl", "best/best",
                        "covrl tok/s",
                        "verl tok/s", "covrl alone", "cost vs PPO", "bytes", "bytes/bw", "of bw",
                        "memcpy same bytes", "of memcpy"], rows))
  if "sharded" in report:
    lines += ["", "## Selection on 8 simulated CPU devices (shard_map), forward + backward", ""]
    rows = [[r["loss"], r["size"], _t(r["global"]), _t(r["local"]), _t(r["ppo"]),
             f"{r['global_over_local']:.2f}x"] for r in report["sharded"]["rows"]]
    lines.append(table(["loss", "size", "global (exact)", "local (verl)", "PPO", "global/local"],
                       rows))
  if "sweep" in report:
    cores = report["sweep"].get("cores", "?")
    lines += ["", f"## Tabular sweep: exact PG + entropy bonus, covrl (jit, scan, sharded over "
              f"{cores} CPU devices) vs NumPy (one core)", ""]
    rows = [[f"{r['instances']}x{r['arms']}x{r['steps']}", _t(r["covrl"]), _t(r["numpy"]),
             f"{r['speedup_vs_numpy']:.1f}x", f"{r['covrl_instance_steps_per_s'] / 1e6:.2f}M",
             f"{r['numpy_instance_steps_per_s'] / 1e6:.2f}M", fmt_time(r["covrl_first_call_s"])]
            for r in report["sweep"]["rows"]]
    lines.append(table(["instances x arms x steps", "covrl", "NumPy", "covrl/NumPy",
                        "covrl inst-steps/s", "NumPy inst-steps/s", "covrl 1st call"], rows))
  if "transformer" in report:
    tr = report["transformer"]
    lines += ["", "## Transformer lab", ""]
    if "skipped" in tr:
      lines.append(f"skipped: {tr['skipped']}")
    else:
      lines.append(table(["part", "time", "tokens/s", "device"], [
          ["rollout", _t(tr["rollout"]), f"{tr['rollout_tokens_per_s']:.0f}", tr["device"]],
          ["update", _t(tr["update"]), f"{tr['update_tokens_per_s']:.0f}", tr["device"]],
      ]) + f"\n\n{tr['description']}")
  if report.get("targets"):
    lines += ["", "## Targets", ""]
    rows = [[t["target"], _fmt(t["measured"]), f"{t['direction']} {_fmt(t['threshold'])}",
             "met" if t["met"] else "NOT met"] for t in report["targets"]]
    lines.append(table(["target", "measured", "target", ""], rows))
  return "\n".join(lines)


def _t(d: dict[str, float]) -> str:
  from benchmarks.common import fmt_time

  med = d["median"]
  half_iqr = 50 * (d["q75"] - d["q25"]) / med if med > 0 else math.nan
  return f"{fmt_time(med)} ±{half_iqr:.0f}%"


def _fmt(x: float) -> str:
  return f"{x:.2f}" if abs(x) < 100 else f"{x:.0f}"


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x


def _write(path: str, report: dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(report, f, indent=1, default=float)


if __name__ == "__main__":
  sys.exit(main())

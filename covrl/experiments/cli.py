"""The `covrl` command: `covrl reproduce` runs every claim of THEORY.md and writes a report::

  covrl reproduce [--fast | --size {test,fast,full,long}] [--out DIR] [--only IDS]
                  [--group G] [--seed N]
  covrl list [--group G]

`reproduce` runs every registered claim (every module in
covrl.experiments.claims.CLAIM_MODULES, so new groups join by registering), shows progress (a
line every 15 s while a claim runs, with the time left as expected from a recorded run:
covrl.experiments.eta), prints a table (claim, measured, predicted or bound, status, seconds),
writes DIR/report.md with figures and DIR/results.json, and exits with 1 if a theorem is not
confirmed or a check raised (2 for bad arguments). Empirical findings (THEORY.md T4) are reported
as reproduced or not reproduced; either is a result, not a failure. Claims left out of a size
(`not_at`: the covariance-regime sweep, the Sort lab's method comparison at full) are listed as
"not run at this size" there; `--size long` runs them all.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Sequence

from covrl.experiments import eta, parallel
from covrl.experiments.claims import registry


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="covrl", description="Entropy control for RL post-training, with its theory checked.")
  sub = parser.add_subparsers(dest="command", required=True)
  rep = sub.add_parser("reproduce", help="run the claims of THEORY.md and write a report")
  sizes = rep.add_mutually_exclusive_group()
  sizes.add_argument("--fast", action="store_const", const="fast", dest="size",
                     help="the CI size (minutes on a laptop CPU)")
  sizes.add_argument("--size", choices=registry.SIZES, dest="size",
                     help="test (seconds per claim), fast, full (the default), or long (full "
                          "plus the claims left out of it: the covariance-regime sweep, the "
                          "Sort lab's method comparison)")
  rep.add_argument("--out", default="covrl-report", help="report folder (default: %(default)s)")
  rep.add_argument("--only", default="",
                   help="comma-separated claim ids or prefixes, e.g. T2.3,T3 (default: all)")
  rep.add_argument("--group", action="append", default=None,
                   help="only claims of this group (repeatable), e.g. tabular")
  rep.add_argument("--seed", type=int, default=0, help="PRNG seed of every check")
  rep.add_argument("--jobs", type=_jobs, default="auto",
                   help="worker processes, each pinned to one CPU core: 'auto' (the default) "
                        "is one per core on a CPU and 1 on an accelerator; 1 runs every claim "
                        "in this process")
  lst = sub.add_parser("list", help="list the registered claims")
  lst.add_argument("--group", action="append", default=None)
  return parser


def _jobs(text: str) -> int | str:
  if text == "auto":
    return text
  try:
    jobs = int(text)
  except ValueError:
    jobs = 0
  if jobs < 1:
    raise argparse.ArgumentTypeError(f"--jobs must be 'auto' or an int >= 1, got {text!r}")
  return jobs


def _select(claims: list[registry.Claim], only: str) -> list[registry.Claim]:
  wanted = [w.strip() for w in only.split(",") if w.strip()]
  if not wanted:
    return claims
  chosen = [c for c in claims if any(c.claim_id == w or c.claim_id.startswith(w + ".")
                                     for w in wanted)]
  unknown = [w for w in wanted if not any(c.claim_id == w or c.claim_id.startswith(w + ".")
                                          for c in claims)]
  if unknown:
    known = ", ".join(c.claim_id for c in claims)
    raise SystemExit(f"covrl: unknown claim(s) {', '.join(unknown)}; known: {known}")
  return chosen


def reproduce(size: str, out: str, only: str = "", groups: Sequence[str] | None = None,
              seed: int = 0, jobs: int | str = 1) -> int:
  """Run the claims, print the table, write the report; returns the exit status.

  `jobs`: worker processes, or "auto" (covrl.experiments.parallel); 1 runs in this process.
  """
  from covrl.experiments import report

  chosen = _select(registry.claims(groups), only)
  if not chosen:
    print("covrl: no claims selected.", file=sys.stderr)
    return 2
  timings = eta.load()
  recorded = {c.claim_id: eta.expected(c.claim_id, size, timings) if size in c.sizes else None
              for c in chosen}
  if jobs == "auto":
    jobs = parallel.auto_jobs(len(parallel.units(chosen, recorded)))
  where = f", {jobs} worker processes" if jobs > 1 else ""
  print(f"covrl reproduce: {len(chosen)} claims at size '{size}', seed {seed}{where}",
        flush=True)
  start = time.perf_counter()
  if jobs > 1:
    results = _run_parallel(chosen, size, seed, jobs, recorded)
  else:
    results = _run_serial(chosen, size, seed, recorded)
  print()
  print(report.table(results))
  doc = report.write(results, {c.claim_id: c for c in chosen}, out, size=size, seed=seed)
  print(f"\n{doc['headline']} ({time.perf_counter() - start:.1f}s); report: {out}/report.md, "
        f"{out}/results.json")
  print(_verdict(doc))
  return 0 if doc["passed"] else 1


def _print_done(result: registry.ClaimResult) -> None:
  print(f"    {result.claim_id} {result.status} in {result.seconds:.1f}s: "
        f"{result.measurement.summary}", flush=True)


def _run_serial(chosen, size, seed, recorded) -> list[registry.ClaimResult]:
  results, pace = [], eta.Pace()
  for i, claim in enumerate(chosen, 1):
    print(f"[{i}/{len(chosen)}] {claim.claim_id} {claim.title} ...", flush=True)
    expected = recorded[claim.claim_id]
    after = sum(recorded[c.claim_id] or 0.0 for c in chosen[i:])
    with eta.Heartbeat(claim.claim_id, expected, after=after, pace=pace.rate):
      result = parallel.run_one(claim, size, seed)
    pace.add(result.seconds, expected)
    results.append(result)
    _print_done(result)
  return results


def _run_parallel(chosen, size, seed, jobs, recorded) -> list[registry.ClaimResult]:
  count, pace = [0], eta.Pace()

  def on_start(claim):
    count[0] += 1
    print(f"[{count[0]}/{len(chosen)}] {claim.claim_id} {claim.title} ...", flush=True)

  def on_done(result):
    pace.add(result.seconds, recorded.get(result.claim_id))
    _print_done(result)

  def heartbeat(running, left):
    rate = pace.rate
    lines = []
    for claim_id, elapsed in running:
      expected = recorded.get(claim_id)
      lines.append(eta.Heartbeat(claim_id, expected, pace=rate, quiet=True).line(elapsed))
    # The job's time left: the running claims' and the waiting ones', shared by the workers.
    rest = left + sum(max(0.0, (recorded.get(i) or 0.0) - t) for i, t in running)
    if left or any(recorded.get(i) for i, _ in running):  # some record to go by
      lines.append(f"    ... the job: about {eta.clock(rest * rate / jobs)} left")
    print("\n".join(lines), flush=True)

  return parallel.run(chosen, size, seed, jobs, recorded, on_start, on_done, heartbeat)


def _verdict(doc: dict) -> str:
  """The closing line: what the exit status means for this run."""
  if doc["passed"]:
    return ("Exit 0: every theorem confirmed and no check raised. Empirical findings (T4) and "
            "targets (C) are results either way: 'not reproduced' and 'not met' are measurements, "
            "with their reasons in the report, not failures.")
  return ("Exit 1: a theorem was not confirmed or a check raised (see the table and the "
          "report).")


# What the claims import beyond the core library, and the extra that installs it.
EXTRA_MODULES = {"flax": "experiments", "orbax.checkpoint": "experiments",
                 "matplotlib": "experiments"}


def missing_extras() -> list[str]:
  """The modules the claims need that this environment lacks (a core-only install lacks all)."""
  missing = []
  for name in EXTRA_MODULES:
    try:
      found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent package (orbax) is missing
      found = False
    if not found:
      missing.append(name)
  return missing


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  missing = missing_extras()
  if missing:
    print(f"covrl: `covrl {args.command}` needs the experiments extra (missing: "
          f"{', '.join(missing)}). From a clone: pip install -e \".[experiments]\"; or: pip "
          "install \"covrl[experiments] @ git+https://github.com/covrl/covrl\".", file=sys.stderr)
    return 2
  if args.command == "list":
    for claim in registry.claims(args.group):
      print(f"{claim.claim_id:6s} [{claim.group}] {claim.title}")
    return 0
  return reproduce(args.size or "full", args.out, args.only, args.group, args.seed, args.jobs)


if __name__ == "__main__":
  sys.exit(main())

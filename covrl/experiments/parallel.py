"""`covrl reproduce --jobs N`: the claims run in N worker processes, one CPU core each.

On a CPU the claims' programs are small: XLA's intra-op threads barely help them (a claim pinned
to one core runs about as fast as with two, measured on two cores), and compilation is single
threaded. So the job runs N claims at once, each worker process pinned to its own core, and the
parent process prints progress and writes the report.

Claims whose checks read one module-level cache (runs computed once and read by several claims)
run in one worker, one after another: they form a *unit* (`units`). The units are handed out
longest first, by recorded time (covrl.experiments.eta), to whichever worker is free.

Every check is a pure function of its size and key, and a unit's claims run in the same order
as in one process, so a claim measures the same in any worker, whatever N > 1. Against one
process with all cores (`--jobs 1`) the tabular and exact-network claims are equal digit for
digit (measured), but XLA's CPU programs may round differently with another number of intra-op
threads: the transformer lab's runs (C1.tf, T3.6.tf) then differ in their last digits, and in a
sampled run such a difference moves later draws. The claims' thresholds do not depend on it.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
import traceback
from collections.abc import Callable, Sequence

from covrl.experiments.claims import registry

# Claim modules that import from a claim module holding a cache, by that module: a claim's unit
# is its check's module, or the module named here (tests/test_parallel.py keeps this complete).
SHARED_CACHES: dict[str, str] = {
    "covrl.experiments.claims.exact_t2": "covrl.experiments.claims.exact_runs",
    "covrl.experiments.claims.exact_t3": "covrl.experiments.claims.exact_runs",
    "covrl.experiments.claims.tabular_t2_rates": "covrl.experiments.claims.tabular_t2",
    "covrl.experiments.claims.control_cost": "covrl.experiments.claims.control",
    "covrl.experiments.claims.control_transformer": "covrl.experiments.claims.control",
}


def unit_of(claim: registry.Claim) -> str:
  """The unit a claim runs in: its check's module, or the module whose cache it shares."""
  module = claim.check.__module__
  return SHARED_CACHES.get(module, module)


def units(claims: Sequence[registry.Claim], recorded: dict[str, float | None]
          ) -> list[list[registry.Claim]]:
  """The claims in units (each in the given order), the longest unit first."""
  grouped: dict[str, list[registry.Claim]] = {}
  for claim in claims:
    grouped.setdefault(unit_of(claim), []).append(claim)
  total = lambda unit: sum(recorded.get(c.claim_id) or 0.0 for c in unit)
  return sorted(grouped.values(), key=total, reverse=True)


def cpu_cores() -> list[int]:
  """The CPU cores this process may run on."""
  if hasattr(os, "sched_getaffinity"):
    return sorted(os.sched_getaffinity(0))
  return list(range(os.cpu_count() or 1))


def auto_jobs(num_units: int) -> int:
  """--jobs auto: one worker per CPU core (at most one per unit) when JAX runs on the CPU; one
  process on an accelerator (the workers would share its memory)."""
  import jax

  if jax.default_backend() != "cpu":
    return 1
  return max(1, min(len(cpu_cores()), num_units))


def run_one(claim: registry.Claim, size: str, seed: int) -> registry.ClaimResult:
  """A claim's result; a check that raises gives a failed result with its error."""
  start = time.perf_counter()
  try:
    return claim.run(size, seed)
  except Exception as e:  # a crashing check is a failed claim, reported with its error
    return errored(claim, size, time.perf_counter() - start, f"{type(e).__name__}: {e}",
                   traceback.format_exc(limit=6))


def errored(claim: registry.Claim, size: str, seconds: float, error: str,
            trace: str = "") -> registry.ClaimResult:
  note = f"the check raised {error}\n{trace}" if trace else error
  measurement = registry.Measurement(False, {"error": error}, {}, f"check raised {error}",
                                     notes=note)
  return registry.ClaimResult(claim.claim_id, claim.title, size, seconds, measurement,
                              claim.kind, error=error)


def _worker(core: int | None, size: str, seed: int, tasks, events) -> None:
  """Run units from `tasks` until a None; report ("start"/"done", ...) on `events`."""
  if core is not None and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {core})  # before JAX starts its CPU client and threads
  while (unit := tasks.get()) is not None:
    for claim_id in unit:
      claim = registry.get(claim_id)
      events.put(("start", claim_id, os.getpid()))
      events.put(("done", claim_id, run_one(claim, size, seed)))


def run(claims: Sequence[registry.Claim], size: str, seed: int, jobs: int,
        recorded: dict[str, float | None],
        on_start: Callable[[registry.Claim], None],
        on_done: Callable[[registry.ClaimResult], None],
        heartbeat: Callable[[list[tuple[str, float]], float], None],
        interval: float = 15.0) -> list[registry.ClaimResult]:
  """Run `claims` in `jobs` worker processes; results in the order of `claims`.

  Args:
    claims: the claims to run.
    size, seed: as `covrl reproduce`.
    jobs: the number of worker processes (each pinned to one core while there are enough).
    recorded: claim id -> recorded seconds (or None), for the order and the ETA.
    on_start, on_done: called in this process when a claim starts and when it ends.
    heartbeat: called every `interval` seconds with [(claim id, seconds spent)] of the claims
      running and the recorded seconds of the claims not yet started.
  """
  by_id = {c.claim_id: c for c in claims}
  plan = units(claims, recorded)
  jobs = max(1, min(jobs, len(plan)))
  cores = cpu_cores()
  context = multiprocessing.get_context("spawn")  # JAX's threads do not survive a fork
  tasks, events = context.Queue(), context.Queue()
  for unit in plan:
    tasks.put([c.claim_id for c in unit])
  for _ in range(jobs):
    tasks.put(None)
  workers = [context.Process(
      target=_worker, args=(cores[i] if jobs <= len(cores) else None, size, seed, tasks,
                            events), daemon=True) for i in range(jobs)]
  for w in workers:
    w.start()
  results: dict[str, registry.ClaimResult] = {}
  running: dict[str, tuple[float, int]] = {}  # claim id -> (start time, worker pid)
  started: set[str] = set()
  last = time.perf_counter()

  def handle(event) -> None:
    kind, claim_id, payload = event
    if kind == "start":
      running[claim_id] = (time.perf_counter(), payload)
      started.add(claim_id)
      on_start(by_id[claim_id])
    else:  # "done"
      running.pop(claim_id, None)
      results[claim_id] = payload
      on_done(payload)

  try:
    while len(results) < len(claims):
      try:
        handle(events.get(timeout=1.0))
      except queue.Empty:
        # What a worker sent before it ended is read first: only then is it known what it left.
        if any(w.exitcode not in (None, 0) for w in workers) or not any(
            w.is_alive() for w in workers):
          while True:
            try:
              handle(events.get(timeout=0.1))
            except queue.Empty:
              break
          _fail_dead_workers(workers, running, plan, started, results, size, on_done)
      now = time.perf_counter()
      if now - last >= interval and running:
        last = now
        left = sum(recorded.get(c.claim_id) or 0.0 for c in claims if c.claim_id not in started)
        heartbeat([(i, now - t) for i, (t, _) in running.items()], left)
  finally:
    for w in workers:
      if w.is_alive():
        w.terminate()
      w.join(timeout=5)
  return [results[c.claim_id] for c in claims]


def _fail_dead_workers(workers, running, plan, started, results, size, on_done) -> None:
  """A worker that died (killed, out of memory) fails its running claim and the rest of its
  unit; the other workers go on."""
  if not any(w.is_alive() for w in workers):  # every worker ended: nothing else will run
    for unit in plan:
      for claim in unit:
        if claim.claim_id not in results:
          results[claim.claim_id] = errored(claim, size, 0.0, "the worker processes ended "
                                            "before running it")
          on_done(results[claim.claim_id])
    running.clear()
    return
  dead = {w.pid: w.exitcode for w in workers if w.exitcode not in (None, 0)}
  for claim_id, (start, pid) in list(running.items()):
    if pid not in dead:
      continue
    running.pop(claim_id)
    unit = next(u for u in plan if any(c.claim_id == claim_id for c in u))
    for claim in unit:
      if claim.claim_id in results or (claim.claim_id in started and claim.claim_id != claim_id):
        continue
      started.add(claim.claim_id)
      result = errored(claim, size, time.perf_counter() - start,
                       f"its worker process died (exit code {dead[pid]})")
      results[claim.claim_id] = result
      on_done(result)

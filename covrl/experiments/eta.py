"""How long each claim takes, and progress with an ETA while `covrl reproduce` runs one.

A claim's check is one call that may compile and run for minutes without printing. While it
runs, `Heartbeat` prints a line every few seconds: the claim, the time spent, and the time left
as expected from a recorded run of the same claim at the same size (timings.json, written by
`python -m covrl.experiments.eta RESULTS.json...` from `covrl reproduce` reports on two CPU cores).
The job's own ETA is the sum of the remaining claims' recorded times. Expected times are a
guide, not a promise: a machine that is busier or faster scales them all alike, so the line
also says how far the run is ahead of or behind the record so far.
"""

from __future__ import annotations

import json
import pathlib
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

TIMINGS = pathlib.Path(__file__).with_name("timings.json")


def load(path: pathlib.Path = TIMINGS) -> dict[str, dict[str, float]]:
  """size -> claim id -> recorded seconds (empty when no record exists)."""
  try:
    return json.loads(path.read_text())["seconds"]
  except (OSError, KeyError, ValueError):
    return {}


def expected(claim_id: str, size: str, timings: dict | None = None) -> float | None:
  """The recorded seconds of a claim at a size, or None."""
  timings = load() if timings is None else timings
  found = timings.get(size, {}).get(claim_id)
  if found is None and size == "long":  # a claim that runs at "long" as at "full"
    found = timings.get("full", {}).get(claim_id)
  return found


def clock(seconds: float) -> str:
  seconds = max(0, round(seconds))
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Pace:
  """How the run compares with the record: observed / recorded seconds of the finished claims
  that have a record (1.0 until they add up to a second)."""

  def __init__(self):
    self.spent = self.recorded = 0.0

  def add(self, seconds: float, recorded: float | None) -> None:
    if recorded is not None:
      self.spent, self.recorded = self.spent + seconds, self.recorded + recorded

  @property
  def rate(self) -> float:
    return self.spent / self.recorded if self.recorded > 1.0 else 1.0


class Heartbeat:
  """Prints `label: 45s, about 2m05s left` every `interval` seconds while a block runs.

  Args:
    label: what is running (a claim id).
    expected: its recorded seconds, or None (then only the time spent is printed).
    after: recorded seconds of the claims still to run after this one (for the job's ETA).
    pace: observed / recorded time of the claims finished so far (1.0 before any).
    stream: where to print (None: sys.stdout as it is when the block starts).
    interval: seconds between lines.
    quiet: print nothing (`line` still gives the text).
  """

  def __init__(self, label: str, expected: float | None, *, after: float = 0.0,
               pace: float = 1.0, stream: TextIO | None = None, interval: float = 15.0,
               quiet: bool = False):
    self.label, self.expected, self.after, self.pace = label, expected, after, pace
    self.stream, self.interval, self.quiet = stream, interval, quiet
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.start = 0.0

  def line(self, elapsed: float) -> str:
    """The progress line after `elapsed` seconds."""
    text = f"    ... {self.label}: {clock(elapsed)}"
    if self.expected is None:
      return text + " (no recorded time for it at this size)"
    left = max(0.0, self.expected * self.pace - elapsed)
    text += f", about {clock(left)} left" if left > 0 else ", longer than recorded"
    if self.after:
      text += f"; the job about {clock(left + self.after * self.pace)} left"
    return text

  def _beat(self) -> None:
    while not self._stop.wait(self.interval):
      print(self.line(time.perf_counter() - self.start), file=self.stream, flush=True)

  def __enter__(self) -> Heartbeat:
    self.start = time.perf_counter()
    if not self.quiet:
      self.stream = sys.stdout if self.stream is None else self.stream
      self._thread = threading.Thread(target=self._beat, daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()


def record(paths: Sequence[str], out: pathlib.Path = TIMINGS) -> dict:
  """Write the claims' seconds from `covrl reproduce` reports (results.json) to `out`, merged
  with what it held (a report replaces its size's entries for the claims it ran, and removes
  those of the claims it lists as not run at that size)."""
  try:
    doc = json.loads(out.read_text())
  except (OSError, ValueError):
    doc = {}
  seconds = doc.get("seconds", {})
  sources = doc.get("sources", {})
  for path in paths:
    report = json.loads(pathlib.Path(path).read_text())
    size = report["size"]
    recorded = seconds.setdefault(size, {})
    kept = set(recorded) - {claim["id"] for claim in report["claims"]}
    for claim in report["claims"]:
      if claim.get("not_run"):  # not run at this size: no time to expect there
        recorded.pop(claim["id"], None)
      else:
        recorded[claim["id"]] = claim["seconds"]
    source = (f"covrl reproduce --size {size}, covrl {report['covrl_version']}, JAX "
              f"{report['jax_version']}, {report['backend']} x {report['device_count']}, "
              f"{report['created']}")
    if kept and sources.get(size):  # a report of some claims: the others keep their source
      source = f"{sources[size]}; then {len(report['claims'])} of the claims from {source}"
    sources[size] = source
  doc = {"about": "Recorded seconds per claim and size, for the ETA `covrl reproduce` prints "
                  "(covrl.experiments.eta); each size from the report named in sources.",
         "sources": sources, "seconds": seconds}
  out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
  return doc


if __name__ == "__main__":
  if len(sys.argv) < 2:
    sys.exit("usage: python -m covrl.experiments.eta RESULTS.json...")
  record(sys.argv[1:])

"""The claim registry: one check per claim of THEORY.md, run by tests, notebooks and the CLI.

A check is a function `check(size, key) -> Measurement` registered under its claim id ("T1.2").
It measures at one of four sizes::

  "test"  seconds, for the unit tests (which assert `passed`),
  "fast"  the CI size of `covrl reproduce --fast`,
  "full"  the default size of `covrl reproduce` (all claims together about 12 minutes on two CPU
          cores, measured alone, in two worker processes; the budget is 15),
  "long"  `covrl reproduce --size long`: the default size plus the long sampled runs that only
          measure something at their own, larger size (the covariance-regime sweep).

A check is written for the sizes "test", "fast" and "full"; `Claim.sizes` maps each run size to
the size its check receives, and "long" runs every check at "full". A claim registered with
`not_at=(...)` is not run at those sizes: its result says so (status "not run at this size"),
neither passing nor failing the run. The sampled sweep in the covariance regime is not run at
"fast" or "full" (at "test" it exercises the code), the Sort lab's comparison of every method
(T4.3) not at "full": their full size alone takes longer than the default job's budget.

The same function serves the test suite, the notebook cell that plots it, and the report, so
nothing is computed in two places. A check returns what it measured, what the theory predicts
(or the bound it must respect), and whether the measurement confirms the claim; arrays for
figures go in `series`. A check never decides `passed` by a tolerance tuned to its own output:
the tolerance is stated in `predicted` and justified in the proof the claim links to.

Three kinds of claims::

  "theorem"    a statement covrl proves (proofs/); a check that does not confirm it is a failure
               of the code or of the claim, and `covrl reproduce` exits non-zero;
  "empirical"  a finding reported from real training (Cui et al., THEORY.md T4), measured in
               covrl's small setting: "reproduced" or "not reproduced";
  "target"     a quantitative goal set for covrl itself (a tracking error, a cost per step),
               measured: "met" or "not met".

Empirical findings and targets are results either way, and the report says which; only a check
that crashes fails the run for them.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

import jax
import numpy as np

Size = Literal["test", "fast", "full", "long"]
SIZES: tuple[str, ...] = ("test", "fast", "full", "long")
# Run size -> the size a check receives.
DEFAULT_SIZES: dict[str, str] = {"test": "test", "fast": "fast", "full": "full", "long": "full"}
Kind = Literal["theorem", "empirical", "target"]
KINDS: tuple[str, ...] = ("theorem", "empirical", "target")


@dataclasses.dataclass
class Measurement:
  """What a check measured.

  Attributes:
    passed: whether the measurement confirms the claim.
    measured: named numbers measured (floats, ints, or short lists of them).
    predicted: named numbers the theory predicts, or bounds, with the tolerance used.
    summary: one line a reader can take in: measured against predicted.
    series: arrays for figures (not written to the summary table).
    notes: caveats: where the claim is weaker than it sounds, where code and claim disagree.
  """

  passed: bool
  measured: dict[str, Any]
  predicted: dict[str, Any]
  summary: str
  series: dict[str, Any] = dataclasses.field(default_factory=dict)
  notes: str = ""


@dataclasses.dataclass
class ClaimResult:
  """A Measurement with the claim it belongs to and how long it took."""

  claim_id: str
  title: str
  size: str
  seconds: float
  measurement: Measurement
  kind: str = "theorem"
  error: str = ""  # set when the check raised instead of measuring
  not_run: bool = False  # the claim measures nothing at this size (`Claim.sizes`)

  @property
  def passed(self) -> bool:
    """Whether the measurement confirms the claim (or reproduces the finding)."""
    return bool(self.measurement.passed) and not self.error and not self.not_run

  @property
  def failed(self) -> bool:
    """A failure of the run: a theorem not confirmed, or any check that raised."""
    return bool(self.error) or (self.kind == "theorem" and not self.passed)

  @property
  def status(self) -> str:
    if self.error:
      return "ERROR"
    if self.not_run:
      return "not run at this size"
    if self.kind == "empirical":
      return "reproduced" if self.passed else "not reproduced"
    if self.kind == "target":
      return "met" if self.passed else "not met"
    return "confirmed" if self.passed else "NOT CONFIRMED"

  def to_json(self) -> dict[str, Any]:
    m = self.measurement
    return {
        "id": self.claim_id,
        "title": self.title,
        "kind": self.kind,
        "status": self.status,
        "size": self.size,
        "passed": self.passed,
        "not_run": self.not_run,
        "seconds": round(self.seconds, 3),
        "measured": jsonable(m.measured),
        "predicted": jsonable(m.predicted),
        "summary": m.summary,
        "notes": m.notes,
    }


@dataclasses.dataclass(frozen=True)
class Claim:
  """A registered claim: its id, title, module group and check."""

  claim_id: str
  title: str
  group: str
  check: Callable[[str, jax.Array], Measurement]
  plot: Callable[[Measurement, Any], None] | None = None
  proof: str = ""
  kind: str = "theorem"
  sizes: dict[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_SIZES))

  def run(self, size: Size = "fast", seed: int = 0) -> ClaimResult:
    if size not in SIZES:
      raise ValueError(f"size must be one of {SIZES}, got {size!r}.")
    if size not in self.sizes:
      measurement = Measurement(
          False, {}, {}, f"not run at size '{size}': measured by covrl reproduce --size long "
          f"(it runs at {', '.join(self.sizes)})",
          notes="At its full size this claim alone takes longer than the default job's budget; "
                "`covrl reproduce --size long` runs it there.")
      return ClaimResult(self.claim_id, self.title, size, 0.0, measurement, self.kind,
                         not_run=True)
    start = time.perf_counter()
    measurement = self.check(self.sizes[size], jax.random.key(seed))
    return ClaimResult(self.claim_id, self.title, size, time.perf_counter() - start, measurement,
                       self.kind)


_REGISTRY: dict[str, Claim] = {}
# Modules that register claims, imported on first use of the registry (in this order).
CLAIM_MODULES: list[str] = [
    "covrl.experiments.claims.tabular", "covrl.experiments.claims.methods",
    "covrl.experiments.claims.transformer", "covrl.experiments.claims.transformer_exact",
    "covrl.experiments.claims.control", "covrl.experiments.claims.control_cost",
    "covrl.experiments.claims.control_transformer", "covrl.experiments.claims.regime",
]


def register(claim_id: str, title: str, *, group: str, proof: str = "",
             plot: Callable[[Measurement, Any], None] | None = None, kind: Kind = "theorem",
             not_at: tuple[str, ...] = ()):
  """Decorator: register `check(size, key) -> Measurement` as the check of `claim_id`.

  `kind` is "theorem" (the default), "empirical" or "target" (see the module docstring).
  `not_at`: sizes ("fast", "full") at which the claim is not run (see the module docstring).

  `plot(measurement, fig)`, when given, draws the claim's figure into `fig`, an empty
  matplotlib Figure (add axes with `fig.subplots(...)`); the report saves it as a PNG.
  """

  if not set(not_at) <= {"fast", "full"}:
    raise ValueError(f"not_at may hold 'fast' and 'full', got {not_at!r}.")

  def wrap(check):
    if claim_id in _REGISTRY:
      raise ValueError(f"claim {claim_id!r} is registered twice.")
    if kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    sizes = {k: v for k, v in DEFAULT_SIZES.items() if k not in not_at}
    _REGISTRY[claim_id] = Claim(claim_id, title, group, check, plot, proof, kind, sizes)
    return check

  return wrap


def _load() -> None:
  for module in CLAIM_MODULES:
    importlib.import_module(module)


def _order(claim_id: str) -> tuple:
  """Sort key: THEORY.md's T claims first, then other letters (C: entropy control); within a
  letter, numerically ("T1.8" < "T1.8.tf" < "T2.1")."""
  letter, parts = claim_id[:1], claim_id[1:].split(".")
  return (letter != "T", letter, *((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts))


def claims(groups: Iterable[str] | None = None) -> list[Claim]:
  """All registered claims (optionally of some groups), in id order."""
  _load()
  chosen = [c for c in _REGISTRY.values() if groups is None or c.group in set(groups)]
  return sorted(chosen, key=lambda c: _order(c.claim_id))


def get(claim_id: str) -> Claim:
  _load()
  if claim_id not in _REGISTRY:
    raise KeyError(f"unknown claim {claim_id!r}; known: {sorted(_REGISTRY)}.")
  return _REGISTRY[claim_id]


def run(claim_id: str, size: Size = "fast", seed: int = 0) -> ClaimResult:
  """Run one claim's check."""
  return get(claim_id).run(size, seed)


def jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [jsonable(v) for v in x]
  if isinstance(x, np.ndarray | jax.Array):
    return jsonable(np.asarray(x).tolist())
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, float) and not np.isfinite(x):
    return str(x)
  return x

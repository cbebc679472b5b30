"""Small helpers shared by the tabular claim checks: sizes, fits and a float64 scope."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from covrl._compat import enable_x64

PROOFS = {
    "T1": "proofs/T1_entropy_covariance.md",
    "T2": "proofs/T2_entropy_bonus_bias.md",
    "T3": "proofs/T3_covariance_control.md",
}


def display_label(label: str) -> str:
  """A run's label as a figure shows it: the entropy bonus's runs (label "entropy",
  "entropy_annealed", "entropy@0.01", from `Control.label`) are called "bonus", so that a legend
  does not read like the entropy curve."""
  method, at, strength = label.partition("@")
  if method in ("entropy", "entropy_annealed"):
    method = "bonus" + method[len("entropy"):]
  return method + at + strength


def proof(claim_id: str) -> str:
  """The link to a claim's proof: its theorem's file and the claim's anchor."""
  return f"{PROOFS[claim_id.split('.')[0]]}#{claim_id}"


def pick(size: str, test: Any, fast: Any, full: Any) -> Any:
  """The value for a size."""
  if size not in ("test", "fast", "full"):
    raise ValueError(f"size must be 'test', 'fast' or 'full', got {size!r}.")
  return {"test": test, "fast": fast, "full": full}[size]


def host_float64():
  """A scope for float64 math: 64-bit JAX, on the host CPU when the default device is not one.

  TPUs have no native float64 and GPUs run it at a fraction of float32 speed (about 1/32 on a
  T4), so on an accelerator runtime the float64 checks run on the host's CPU device, which
  every JAX backend also provides.
  """
  scope = contextlib.ExitStack()
  scope.enter_context(enable_x64(True))
  if jax.default_backend() != "cpu":
    scope.enter_context(jax.default_device(jax.devices("cpu")[0]))
  return scope


def float64(check: Callable) -> Callable:
  """Run a check in `host_float64()` (global state is restored afterwards)."""

  @functools.wraps(check)
  def wrapped(size, key):
    with host_float64():
      return check(size, key)

  return wrapped


def full_float32(check: Callable) -> Callable:
  """Run a check with float32 matmuls at full precision.

  For checks that compare float32 numbers (a first-order prediction against the change it
  predicts, a pooled estimator against the exact one): TPUs multiply float32 matrices in bf16
  passes by default and recent GPUs in TF32, whose round-off (about 1e-3 and 5e-4 relative) would
  be measured as the claim's error. On the CPU the scope changes nothing.
  """

  @functools.wraps(check)
  def wrapped(size, key):
    with jax.default_matmul_precision("highest"):
      return check(size, key)

  return wrapped


def seed_of(key: jax.Array) -> int:
  """A host integer seed derived from a JAX key (for NumPy draws of problem instances)."""
  return int(jax.random.randint(key, (), 0, 2**31 - 1))


def loglog_slope(x, y) -> float:
  """Least-squares slope of log|y| against log x."""
  x, y = np.asarray(x, np.float64), np.abs(np.asarray(y, np.float64))
  return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def bootstrap_slope(x, runs, *, num_resamples: int = 1000, seed: int = 0) -> tuple[float, ...]:
  """Log-log slope of the mean over runs, with a 95% bootstrap interval over the runs.

  Args:
    x: [T] positive abscissae.
    runs: [n, T] positive values, one row per independent run.

  Returns:
    (slope, low, high).
  """
  runs = np.asarray(runs, np.float64)
  rng = np.random.default_rng(seed)
  slope = loglog_slope(x, runs.mean(0))
  picks = rng.integers(0, runs.shape[0], size=(num_resamples, runs.shape[0]))
  boot = [loglog_slope(x, runs[p].mean(0)) for p in picks]
  low, high = np.percentile(boot, [2.5, 97.5])
  return slope, float(low), float(high)


def fmt(x: float, digits: int = 3) -> str:
  return f"{x:.{digits}g}"

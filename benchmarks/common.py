"""Timing and reporting helpers shared by the benchmark parts.

Timings are taken side by side: `interleaved` runs one repetition of every contestant in turn,
round after round, so that a slow stretch of a shared machine hits all of them alike. Each
sample is the mean over `inner` back-to-back calls (chosen so one sample lasts a few
milliseconds, well above the timer's resolution), and a timing is reported as the median of the
samples with its interquartile range and min/max.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds per call over repeated samples: median, quartiles, extremes."""

  median: float
  q25: float
  q75: float
  min: float
  max: float
  samples: int
  inner: int
  values: tuple[float, ...] = ()  # the samples, in round order

  @classmethod
  def of(cls, seconds: Sequence[float], inner: int) -> Timing:
    s = np.asarray(seconds, np.float64)
    q25, med, q75 = np.percentile(s, [25, 50, 75])
    return cls(float(med), float(q25), float(q75), float(s.min()), float(s.max()), len(s), inner,
               tuple(float(v) for v in s))

  @property
  def iqr_frac(self) -> float:
    """Interquartile range relative to the median (the spread shown in the tables)."""
    return (self.q75 - self.q25) / self.median if self.median > 0 else math.nan

  def as_dict(self) -> dict[str, float]:
    d = dataclasses.asdict(self)
    d["unit"] = "seconds per call"
    return d


def paired_ratio(num: Timing, den: Timing) -> dict[str, float]:
  """Median (and quartiles) over rounds of num / den, each round's two samples taken together.

  On a shared machine the load drifts between rounds; the ratio of two contestants timed in the
  same round is steadier than the ratio of their overall medians.
  """
  r = np.asarray(num.values) / np.asarray(den.values)
  q25, med, q75 = np.percentile(r, [25, 50, 75])
  return {"median": float(med), "q25": float(q25), "q75": float(q75)}


def _calibrate(fn: Callable[[], Any], target_s: float) -> int:
  """Calls per sample so that a sample lasts about target_s (after one warm-up call)."""
  fn()
  start = time.perf_counter()
  fn()
  once = time.perf_counter() - start
  return max(1, min(1000, round(target_s / max(once, 1e-7))))


def interleaved(
    contestants: dict[str, Callable[[], Any]],
    *,
    rounds: int,
    target_s: float = 0.005,
    warmup: int = 2,
) -> dict[str, Timing]:
  """Time each zero-argument callable, one sample of each per round, in turn.

  Each callable must block until its result is ready (call `block_until_ready` or return host
  values). The order of the contestants alternates between rounds (forward, then reversed), so
  none of them always runs right after the same neighbour.

  Args:
    contestants: name -> callable.
    rounds: samples per contestant.
    target_s: rough duration of one sample; calls are repeated inside a sample to reach it.
    warmup: untimed calls per contestant before the first round (compilation, caches).

  Returns:
    name -> Timing (seconds per call).
  """
  inner = {}
  for name, fn in contestants.items():
    for _ in range(warmup):
      fn()
    inner[name] = _calibrate(fn, target_s)
  samples: dict[str, list[float]] = {name: [] for name in contestants}
  names = list(contestants)
  for r in range(rounds):
    for name in names if r % 2 == 0 else names[::-1]:
      fn, n = contestants[name], inner[name]
      start = time.perf_counter()
      for _ in range(n):
        fn()
      samples[name].append((time.perf_counter() - start) / n)
  return {name: Timing.of(samples[name], inner[name]) for name in names}


def copy_bandwidth(*, num_bytes: int = 1 << 28, rounds: int = 9) -> dict[str, Any]:
  """Memory copy bandwidth on this machine, two ways, in bytes per second (read + write).

  NumPy's `np.copyto` of a float32 array (a plain memcpy) and a jitted JAX `x * 1.0 + 0.0` that
  XLA cannot elide (it must read x and write a new buffer). Both count 2 * num_bytes moved per
  call. The faster one is what the losses are compared against.
  """
  import jax
  import jax.numpy as jnp

  n = num_bytes // 4
  src = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
  dst = np.empty_like(src)
  x = jnp.asarray(src)
  scale = jnp.asarray(1.0, jnp.float32)  # a traced scale, so XLA cannot drop the multiply
  copy = jax.jit(lambda a, s: a * s + 0.0)
  t = interleaved(
      {
          "numpy_copyto": lambda: np.copyto(dst, src),
          "jax_copy": lambda: copy(x, scale).block_until_ready(),
      },
      rounds=rounds, target_s=0.05, warmup=1,
  )
  moved = 2 * n * 4
  out = {name: {"bytes_per_s": moved / tm.median, "timing": tm.as_dict()} for name, tm in t.items()}
  best = max(out, key=lambda k: out[k]["bytes_per_s"])
  return {"array_bytes": n * 4, "bytes_moved_per_call": moved, "methods": out, "best": best,
          "bytes_per_s": out[best]["bytes_per_s"]}


def run_module_with_devices(module: str, args: Sequence[str], devices: int, *,
                            timeout_s: float) -> dict[str, Any]:
  """Run `python -m module args` with `devices` simulated CPU devices; parse its last JSON line.

  A part that needs several JAX devices runs in a subprocess so that the parent keeps one.
  """
  import json

  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "")
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  proc = subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True,
                        text=True, timeout=timeout_s, cwd=root, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info() -> dict[str, Any]:
  """Where the numbers come from: CPU, cores, thread settings, library versions."""
  import jax

  info: dict[str, Any] = {
      "platform": platform.platform(),
      "python": sys.version.split()[0],
      "processor": _cpu_model(),
      "cpu_count": os.cpu_count(),
      "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "env": {k: os.environ.get(k) for k in (
          "XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
          "OPENBLAS_CORETYPE", "JAX_PLATFORMS", "JAX_ENABLE_X64")},
      "versions": {"numpy": np.__version__, "jax": jax.__version__},
      "jax_devices": [str(d) for d in jax.devices()],
      "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
  }
  try:
    import jaxlib
    info["versions"]["jaxlib"] = jaxlib.__version__
    import covrl
    info["versions"]["covrl"] = covrl.__version__
    info["git_commit"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
  except Exception:  # pragma: no cover - informational only
    pass
  return info


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def fmt_time(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "-"
  for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
    if seconds >= scale:
      return f"{seconds / scale:.3g} {unit}"
  return f"{seconds / 1e-9:.3g} ns"


def fmt_timing(t: Timing) -> str:
  return f"{fmt_time(t.median)} ±{100 * t.iqr_frac / 2:.0f}%"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A plain-text (Markdown-compatible) table."""
  cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])

"""Vocabulary scale: peak memory and time of log pi(y) + entropy, forward + backward.

  python -m benchmarks.vocab [--quick] [--out benchmarks/vocab_results.json]
  python -m benchmarks.vocab --sweep          # chunk sizes of the fused path
  python -m benchmarks.vocab --platform gpu   # JAX contestants on the first GPU (see below)
  python -m benchmarks.vocab --render benchmarks/vocab_results.json

Every contestant computes, from hidden states h [N, D] and an output projection W, the loss
L = sum_i a_i log pi_i(y_i) + 0.01 sum_i H_i (a_i random per-token weights, pi = softmax(h W))
and its gradient with respect to h and W:

  covrl fused     covrl.token_log_probs_and_entropy (chunks of token_chunk x vocab_chunk; the
                  logits are never materialised), jitted;
  covrl unfused   logits = h @ W, then log_softmax + take_along_axis and covrl.entropy_bonus_loss
                  (the path covrl offered before), jitted;
  verl logits     verl 0.9.1 on CPU torch: logits = h @ W^T, logprobs_from_logits (its
                  log_softmax + gather fallback; flash-attn is GPU-only) and
                  entropy_from_logits_with_chunking (rows in chunks of 2048);
  verl fused      verl's FusedLinearForPPO, torch backend (hidden states in, 512-token chunks
                  with the full vocabulary per chunk, recomputed in the backward pass);
  TRL logits      TRL's selective_log_softmax_and_entropy (row-chunked logsumexp and entropy)
                  on logits = h @ W^T materialised in torch.

Each (size, contestant) runs in its own subprocess. Memory: the process's resident set after
importing its framework (idle), after building the inputs (h, W, tokens, weights), and its peak
(VmHWM, reset through /proc/self/clear_refs once the inputs exist) over the first call (which
compiles) and the timed calls. "peak" in the table is the peak minus the idle baseline: inputs,
outputs (the gradients) and everything the call allocates on top. Time: the median of the timed
calls after one warm-up call. Before running, each configuration's memory is estimated: above
10 GiB it is skipped (reported as "skipped: needs ~X GiB"), above 6 GiB it runs holding
`flock /tmp/covrl-mem.lock` (this project's shared-machine rule). Targets (figures, not
assertions): the fused path's peak at most 1/8 of the unfused path's at the largest size the
unfused path fits, and its time at most 1.3x the unfused path's.

--platform gpu runs the two covrl contestants on the first GPU instead (memory: JAX's
`peak_bytes_in_use`; bfloat16 h and W as well as float32), for a device that has the room; the
torch peers are CPU-only here and are skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any

D = 1024
SIZES = [(4096, 32768), (16384, 32768), (4096, 131072), (16384, 131072)]  # (B x T, V)
QUICK_SIZES = [(2048, 8192), (4096, 32768)]
CONTESTANTS = ("covrl_fused", "covrl_unfused", "verl_logits", "verl_fused", "trl_logits")
NAMES = {"covrl_fused": "covrl fused", "covrl_unfused": "covrl unfused",
         "verl_logits": "verl logits", "verl_fused": "verl fused (torch)",
         "trl_logits": "TRL logits"}
TAKES = {"covrl_fused": "hidden", "covrl_unfused": "logits", "verl_logits": "logits",
         "verl_fused": "hidden", "trl_logits": "logits"}
SKIP_GIB, LOCK_GIB = 10.0, 6.0
LOCK = "/tmp/covrl-mem.lock"
MEMORY_TARGET, TIME_TARGET = 1 / 8, 1.3
ENTROPY_COEF = 0.01
GIB = 2.0**30


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def estimate_gib(contestant: str, n: int, v: int, d: int = D, *, token_chunk: int = 1024,
                 vocab_chunk: int = 8192) -> float:
  """Rough peak (GiB) above idle, float32: from XLA's memory analysis of the unfused path
  (about 6.5 logits-sized buffers) and the fused one (a few chunk-sized ones); torch peers are
  charged like the unfused path. Used only to skip or lock, never reported as a measurement."""
  logits, kernel, hidden = 4.0 * n * v, 4.0 * d * v, 4.0 * n * d
  io = 2 * (kernel + hidden)  # inputs and their gradients
  if contestant == "covrl_fused":
    extra = kernel + 6 * 4.0 * min(token_chunk, n) * min(vocab_chunk, v)
  elif contestant == "verl_fused":
    extra = kernel + 6 * 4.0 * min(512, n) * v
  else:
    extra = 6.5 * logits
  return (io + extra) / GIB + 0.3


# ----------------------------------------------------------------------------------------------
# Worker: one contestant at one size, in its own process


def _status(key: str) -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) * 1024.0
  return math.nan


def _reset_peak() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _inputs(n: int, v: int, d: int, seed: int):
  """float32 NumPy inputs: h ~ N(0, 1), W ~ N(0, 4 / D) (logits of standard deviation ~2, as an
  LM's), uniform token ids, per-token weights a ~ N(0, 1). W is [V, D] (torch's layout)."""
  import numpy as np

  rng = np.random.default_rng(seed)
  h = rng.standard_normal((n, d), dtype=np.float32)
  w_vd = rng.standard_normal((v, d), dtype=np.float32)
  w_vd *= np.float32(2.0 / math.sqrt(d))
  y = rng.integers(0, v, n).astype(np.int64)
  a = rng.standard_normal(n, dtype=np.float32)
  return h, w_vd, y, a


def _jax_call(contestant: str, cfg: dict[str, Any]):
  import jax
  import jax.numpy as jnp
  import numpy as np

  import covrl

  dtype = jnp.dtype(cfg.get("dtype", "float32"))
  h_np, w_vd, y_np, a_np = _inputs(cfg["n"], cfg["v"], cfg["d"], cfg["seed"])
  device = jax.devices(cfg.get("platform", "cpu"))[0]
  # Cast on the host, so that no float32 copy passes through the device's peak memory.
  h = jax.device_put(h_np.astype(dtype), device)
  w = jax.device_put(np.ascontiguousarray(w_vd.T).astype(dtype), device)
  y, a = jax.device_put(y_np.astype(np.int32), device), jax.device_put(a_np, device)
  del h_np, w_vd, y_np, a_np
  tc, vc = cfg["token_chunk"], cfg["vocab_chunk"]

  if contestant == "covrl_fused":
    def loss(h, w):
      lp, ent = covrl.token_log_probs_and_entropy(h, w, y, token_chunk=tc, vocab_chunk=vc)
      return jnp.sum(a * lp) + ENTROPY_COEF * jnp.sum(ent), (lp, ent)
  else:
    mask = jnp.ones((1, cfg["n"]), bool)

    def loss(h, w):
      z = jnp.dot(h, w, preferred_element_type=jnp.float32)[None]
      lp = jnp.take_along_axis(jax.nn.log_softmax(z), y[None, :, None], axis=-1)[0, :, 0]
      bonus, metrics = covrl.entropy_bonus_loss(z, mask, coef=ENTROPY_COEF,
                                                loss_agg_mode="token-sum")
      return jnp.sum(a * lp) - bonus, (lp, metrics["entropy"])

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

  def call():
    out = jax.block_until_ready(step(h, w))
    return out

  def summary(out):
    (value, (lp, _)), (dh, dw) = out
    norm = lambda g: float(np.linalg.norm(np.asarray(
        jnp.linalg.norm(g.astype(jnp.float32), axis=-1), np.float64)))
    return {"loss": float(value), "sum_log_prob": float(jnp.sum(lp)),
            "grad_hidden_norm": norm(dh), "grad_kernel_norm": norm(dw)}

  def memory():
    stats = device.memory_stats() or {}
    return stats.get("peak_bytes_in_use")

  return call, summary, memory, {"jax": jax.__version__, "device": str(device),
                                 "device_kind": device.device_kind}


def _torch_call(contestant: str, cfg: dict[str, Any]):
  import torch

  h_np, w_vd, y_np, a_np = _inputs(cfg["n"], cfg["v"], cfg["d"], cfg["seed"])
  h = torch.from_numpy(h_np).requires_grad_(True)
  w = torch.from_numpy(w_vd).requires_grad_(True)  # [V, D], no copy
  y, a = torch.from_numpy(y_np), torch.from_numpy(a_np)
  versions = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}

  if contestant == "verl_fused":
    import verl
    from verl.utils.experimental.torch_functional import FusedLinearForPPO

    fused = FusedLinearForPPO(chunk_size=512, impl_backend="torch")
    forward = lambda: fused(h, w, y)
    versions["verl"] = verl.__version__
  elif contestant == "verl_logits":
    import verl
    from verl.utils import torch_functional as F

    def forward():
      logits = h @ w.t()
      return F.logprobs_from_logits(logits, y), F.entropy_from_logits_with_chunking(logits)
    versions["verl"] = verl.__version__
  elif contestant == "trl_logits":
    import trl
    from trl.trainer.utils import selective_log_softmax_and_entropy

    def forward():
      return selective_log_softmax_and_entropy(h @ w.t(), y)
    versions["trl"] = trl.__version__
  else:
    raise ValueError(contestant)

  def call():
    h.grad = w.grad = None
    lp, ent = forward()
    value = torch.sum(a * lp) + ENTROPY_COEF * torch.sum(ent)
    value.backward()
    return value.detach(), lp.detach(), h.grad, w.grad

  def summary(out):
    value, lp, dh, dw = out
    # Row norms first, then float64: torch's float32 norm of a 10^6-entry array on CPU is off
    # by ~1e-4 relative (measured), which would read as a disagreement of the gradients.
    norm = lambda g: float(g.norm(dim=-1).double().norm())
    return {"loss": float(value), "sum_log_prob": float(lp.sum()),
            "grad_hidden_norm": norm(dh), "grad_kernel_norm": norm(dw)}

  return call, summary, lambda: None, versions


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
  """Build the inputs, reset the peak, call once (warm-up, compiles), time `repeats` calls."""
  contestant = cfg["contestant"]
  if contestant.startswith("covrl"):
    import jax
    import jax.numpy as jnp

    jax.block_until_ready(jnp.zeros(1))  # start the runtime before measuring the idle process
    build = _jax_call
  else:
    import torch

    torch.zeros(1).sum()
    build = _torch_call
  idle = _status("VmRSS")
  call, summary, device_peak, versions = build(contestant, cfg)
  import gc

  gc.collect()
  inputs = _status("VmRSS")
  peak_reset = _reset_peak()
  start = time.perf_counter()
  out = call()
  first = time.perf_counter() - start
  result = summary(out)
  del out
  gc.collect()
  # The peak so far includes compiling; a second reset measures the timed calls alone.
  peak_first = _status("VmHWM")
  _reset_peak()
  times = []
  for _ in range(cfg["repeats"]):
    start = time.perf_counter()
    out = call()
    times.append(time.perf_counter() - start)
    del out
  peak_timed = _status("VmHWM")
  peak = max(peak_first, peak_timed)
  return {**cfg, "idle_rss_bytes": idle, "inputs_rss_bytes": inputs, "peak_rss_bytes": peak,
          "peak_reset": peak_reset, "peak_above_idle_bytes": peak - idle,
          "timed_peak_above_idle_bytes": peak_timed - idle,
          "peak_above_inputs_bytes": peak - inputs, "device_peak_bytes": device_peak(),
          "first_call_s": first, "times_s": times, "median_s": statistics.median(times),
          "check": result, "versions": versions}


# ----------------------------------------------------------------------------------------------
# Parent: every configuration in a subprocess


def _available(contestant: str) -> tuple[bool, str]:
  mod = {"verl_logits": "verl.utils.torch_functional",
         "verl_fused": "verl.utils.experimental.torch_functional",
         "trl_logits": "trl.trainer.utils"}.get(contestant)
  if mod is None:
    return True, ""
  proc = subprocess.run([sys.executable, "-c", f"import torch, {mod}"], capture_output=True,
                        text=True, check=False)
  if proc.returncode:
    return False, proc.stderr.strip().splitlines()[-1] if proc.stderr else "import failed"
  return True, ""


def run_one(cfg: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
  """One configuration in a subprocess (under the memory lock when it is large)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  if cfg.get("platform", "cpu") == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", "benchmarks.vocab", "--worker", json.dumps(cfg)]
  locked = cfg["estimate_gib"] > LOCK_GIB and cfg.get("platform", "cpu") == "cpu"
  if locked:
    cmd = ["flock", LOCK, *cmd]
  start = time.perf_counter()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s,
                        cwd=root, check=False)
  if proc.returncode:
    return {**cfg, "error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  out["wall_s"] = time.perf_counter() - start
  out["locked"] = locked
  return out


def run(sizes, contestants, *, repeats: int, big_repeats: int, seed: int, token_chunk: int,
        vocab_chunk: int, platform: str = "cpu", dtypes=("float32",), timeout_s: float = 3600,
        skip=(), max_gib: float = SKIP_GIB, log=_log) -> dict[str, Any]:
  rows = []
  available = {c: _available(c) for c in contestants}
  for n, v in sizes:
    for dtype in dtypes:
      for c in contestants:
        est = estimate_gib(c, n, v, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
        base = {"contestant": c, "n": n, "v": v, "d": D, "dtype": dtype, "seed": seed,
                "token_chunk": token_chunk, "vocab_chunk": vocab_chunk, "platform": platform,
                "repeats": repeats if n * v <= (1 << 27) else big_repeats,
                "estimate_gib": round(est, 2)}
        ok, why = available[c]
        if not ok:
          rows.append({**base, "skipped": f"not installed ({why})"})
        elif f"{c}:{n}x{v}" in skip:
          rows.append({**base, "skipped": "time on a shared machine (--skip)"})
        elif platform == "cpu" and est > max_gib:
          rows.append({**base, "skipped": f"needs ~{est:.0f} GiB"})
        else:
          log(f"  {NAMES[c]:<20} {n}x{v} {dtype} (estimate {est:.1f} GiB)")
          rows.append(run_one(base, timeout_s=timeout_s))
          r = rows[-1]
          if "error" in r:
            log(f"    error: {r['error'][-300:]}")
          else:
            log(f"    {r['median_s']:.2f} s, peak {r['peak_above_idle_bytes'] / GIB:.2f} GiB "
                f"above idle (first call {r['first_call_s']:.1f} s)")
  return {"rows": rows, "targets": targets(rows)}


def _find(rows, contestant, n, v, dtype="float32"):
  for r in rows:
    if (r["contestant"], r["n"], r["v"], r.get("dtype", "float32")) == (contestant, n, v, dtype):
      return r if "median_s" in r else None
  return None


def _peak(r) -> float:
  dev = r.get("device_peak_bytes")
  return dev if dev else r["peak_above_idle_bytes"]


def targets(rows) -> list[dict[str, Any]]:
  """Memory at the largest size(s) the unfused path ran at, time at every size both ran."""
  out = []
  pairs = []
  for r in rows:
    if r["contestant"] == "covrl_fused" and "median_s" in r:
      u = _find(rows, "covrl_unfused", r["n"], r["v"], r.get("dtype", "float32"))
      if u:
        pairs.append((r, u))
  if pairs:
    largest = max(u["n"] * u["v"] for _, u in pairs)
    for f, u in pairs:
      size = f"{f['n']}x{f['v']} {f.get('dtype', 'float32')}"
      if f["n"] * f["v"] == largest:
        ratio = _peak(f) / _peak(u)
        out.append({"target": f"peak memory fused/unfused, {size}", "measured": ratio,
                    "threshold": MEMORY_TARGET, "direction": "<=", "met": ratio <= MEMORY_TARGET})
        if f.get("timed_peak_above_idle_bytes") and u.get("timed_peak_above_idle_bytes"):
          ratio = f["timed_peak_above_idle_bytes"] / u["timed_peak_above_idle_bytes"]
          out.append({"target": f"peak memory fused/unfused over the timed calls, {size}",
                      "measured": ratio, "threshold": MEMORY_TARGET, "direction": "<=",
                      "met": ratio <= MEMORY_TARGET})
      ratio = f["median_s"] / u["median_s"]
      out.append({"target": f"time fused/unfused, {size}", "measured": ratio,
                  "threshold": TIME_TARGET, "direction": "<=", "met": ratio <= TIME_TARGET})
  return out


def sweep(n: int, v: int, token_chunks, vocab_chunks, *, repeats: int, seed: int,
          log=_log) -> dict[str, Any]:
  rows = []
  for tc in token_chunks:
    for vc in vocab_chunks:
      est = estimate_gib("covrl_fused", n, v, token_chunk=tc, vocab_chunk=vc)
      cfg = {"contestant": "covrl_fused", "n": n, "v": v, "d": D, "dtype": "float32",
             "seed": seed, "token_chunk": tc, "vocab_chunk": vc, "platform": "cpu",
             "repeats": repeats, "estimate_gib": round(est, 2)}
      log(f"  sweep token_chunk={tc} vocab_chunk={vc}")
      rows.append(run_one(cfg, timeout_s=3600))
  return {"n": n, "v": v, "rows": rows}


# ----------------------------------------------------------------------------------------------
# Report


def render(report: dict[str, Any]) -> str:
  from benchmarks.common import table

  m = report["machine"]
  lines = [f"# Vocabulary scale: log pi(y) + entropy, forward + backward wrt h and W "
           f"(D = {D}){' (--quick)' if report.get('quick') else ''}", "",
           f"machine: {m['processor']}, {m['affinity_cpus']} cores; platform "
           f"{report.get('platform', 'cpu')}; jax {m['versions'].get('jax')}; "
           + ", ".join(f"{k} {v}" for k, v in report.get("peer_versions", {}).items())
           + f"; load average at start {', '.join(f'{x:.1f}' for x in m['load_average'] or ())}",
           f"fused chunks: token_chunk={report['token_chunk']}, "
           f"vocab_chunk={report['vocab_chunk']}"]
  if "results" in report:
    rows = []
    res = report["results"]["rows"]
    for r in res:
      size = f"{r['n']}x{r['v'] // 1024}k"
      name = NAMES[r["contestant"]] + ("" if r.get("dtype", "float32") == "float32"
                                       else f" {r['dtype']}")
      if "skipped" in r or "error" in r:
        why = r.get("skipped") or "error: " + r["error"].strip().splitlines()[-1][:80]
        rows.append([size, name, TAKES[r["contestant"]], f"skipped: {why}", "-", "-", "-", "-",
                     "-", "-", "-"])
        continue
      u = _find(res, "covrl_unfused", r["n"], r["v"], r.get("dtype", "float32"))
      t_ratio = f"{r['median_s'] / u['median_s']:.2f}x" if u else "-"
      m_ratio = f"{_peak(r) / _peak(u):.3f}" if u else "-"
      rows.append([size, name, TAKES[r["contestant"]], f"{r['median_s']:.2f} s", t_ratio,
                   f"{_peak(r) / GIB:.2f} GiB", m_ratio,
                   "-" if r.get("device_peak_bytes") else
                   f"{r['peak_above_inputs_bytes'] / GIB:.2f} GiB",
                   f"{r['timed_peak_above_idle_bytes'] / GIB:.2f} GiB"
                   if r.get("timed_peak_above_idle_bytes") else "-",
                   f"{r['first_call_s']:.1f} s",
                   f"{len(r['times_s'])}"])
    peak_name = ("device peak" if any(r.get("device_peak_bytes") for r in res)
                 else "peak above idle")
    lines += ["", table(["B x T x V", "contestant", "takes", "time (median)", "vs unfused",
                         peak_name, "vs unfused", "peak above inputs", "peak, timed calls",
                         "1st call",
                         "timed calls"], rows)]
    lines += ["", "\"takes logits\": the contestant is given logits = h W, materialised in full "
              "(verl's and TRL's functions take logits); its time and memory include that matmul "
              "and its gradient."]
    checks = _agreement(res)
    if checks:
      lines += ["", "agreement with covrl unfused (max relative difference of the loss, sum of "
                "log pi and the two gradient norms): " + "; ".join(checks)]
    if report["results"].get("targets"):
      lines += ["", "## Targets", ""]
      lines.append(table(["target", "measured", "target", ""], [
          [t["target"], f"{t['measured']:.3f}", f"{t['direction']} {t['threshold']:.3f}",
           "met" if t["met"] else "NOT met"] for t in report["results"]["targets"]]))
  if "sweep" in report:
    sw = report["sweep"]
    lines += ["", f"## Chunk sizes, covrl fused at {sw['n']}x{sw['v']}", ""]
    rows = [[r["token_chunk"], r["vocab_chunk"],
             f"{r['median_s']:.2f} s" if "median_s" in r else "error",
             f"{r['peak_above_idle_bytes'] / GIB:.2f} GiB" if "median_s" in r else "-"]
            for r in sw["rows"]]
    lines.append(table(["token_chunk", "vocab_chunk", "time", "peak above idle"], rows))
  return "\n".join(lines)


def _agreement(rows) -> list[str]:
  out = []
  for r in rows:
    if "check" not in r or r["contestant"] == "covrl_unfused":
      continue
    u = _find(rows, "covrl_unfused", r["n"], r["v"], r.get("dtype", "float32"))
    if not u:
      continue
    worst = max(abs(r["check"][k] - u["check"][k]) / max(abs(u["check"][k]), 1e-30)
                for k in u["check"])
    out.append(f"{NAMES[r['contestant']]} {r['n']}x{r['v']}: {worst:.1e}")
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description="covrl vocabulary-scale benchmark (benchmarks/vocab.py)")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  p.add_argument("--quick", action="store_true", help="small sizes only (a few minutes)")
  p.add_argument("--sweep", action="store_true", help="chunk-size sweep of the fused path")
  p.add_argument("--platform", default="cpu", choices=("cpu", "gpu"))
  p.add_argument("--out", default=None, help="JSON output (default benchmarks/vocab_*.json)")
  p.add_argument("--render", metavar="JSON")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--token-chunk", type=int, default=1024)
  p.add_argument("--vocab-chunk", type=int, default=8192)
  p.add_argument("--contestants", default=",".join(CONTESTANTS))
  p.add_argument("--big-repeats", type=int, default=2,
                 help="timed calls above 2^27 logits (after the warm-up call)")
  p.add_argument("--max-gib", type=float, default=SKIP_GIB,
                 help="skip CPU configurations estimated above this many GiB (default %(default)s: "
                      "a machine shared with other jobs; raise it on a machine of your own)")
  p.add_argument("--sizes", default="", help="NxV,... instead of the issue's four sizes")
  p.add_argument("--skip", default="", help="contestant:NxV,... configurations not to run")
  args = p.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(json.loads(args.worker))))
    return 0
  if args.render:
    with open(args.render) as f:
      print(render(json.load(f)))
    return 0

  from benchmarks import common

  report: dict[str, Any] = {
      "command": " ".join(["python", "-m", "benchmarks.vocab", *(argv or sys.argv[1:])]),
      "started": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick,
      "platform": args.platform, "machine": common.machine_info(),
      "token_chunk": args.token_chunk, "vocab_chunk": args.vocab_chunk}
  start = time.perf_counter()
  if args.sweep:
    report["sweep"] = sweep(4096, 32768, (256, 1024, 4096), (2048, 8192, 32768), repeats=2,
                            seed=args.seed)
    out = args.out or "benchmarks/vocab_sweep.json"
  else:
    contestants = [c for c in args.contestants.split(",") if c]
    dtypes = ("float32",)
    if args.platform == "gpu":
      contestants = [c for c in contestants if c.startswith("covrl")]
      dtypes = ("float32", "bfloat16")
    sizes = QUICK_SIZES if args.quick else SIZES
    if args.sizes:
      sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    report["results"] = run(sizes, contestants, repeats=3, big_repeats=args.big_repeats,
                            seed=args.seed, token_chunk=args.token_chunk,
                            vocab_chunk=args.vocab_chunk, platform=args.platform,
                            dtypes=dtypes, skip=set(filter(None, args.skip.split(","))),
                            max_gib=args.max_gib)
    versions = {}
    for r in report["results"]["rows"]:
      versions.update({k: v for k, v in r.get("versions", {}).items() if k != "device"})
    report["peer_versions"] = versions
    out = args.out or ("benchmarks/vocab_results.json" if args.platform == "cpu"
                       else "benchmarks/vocab_results_gpu.json")
  report["elapsed_s"] = time.perf_counter() - start
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(report, f, indent=1, default=float)
  print(render(report))
  _log(f"wrote {out} ({report['elapsed_s']:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())

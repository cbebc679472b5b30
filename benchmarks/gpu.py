"""The accelerator run: notebooks at their default size, the lab's GPU config, covrl's losses.

A prepared script for a machine with a GPU (or TPU), to be run once where one is at hand, in the
runtime's own Python and JAX (nothing is installed: the checkout is put on PYTHONPATH):

  bash benchmarks/gpu.sh [OUT_DIR]          # writes OUT_DIR/gpu.json and prints the tables
  python -m benchmarks.gpu --quick          # a minute on a CPU: checks the script itself

It records the device (kind, count, backend), the versions, and

  notebooks    each notebook's code cells executed in order in one fresh process per notebook
               (IPython's `%` and `!` lines skipped: the runtime already has its packages), the
               wall time, and the error if one stopped it;
  transformer  the lab's GRPO step at `lab_config("gpu")`: rollout and update, tokens per second;
  losses       covrl's PPO, Clip-Cov and KL-Cov losses (forward + backward wrt log pi) and the
               entropy bonus (wrt the logits), jitted, at LLM-like token counts, tokens per second.

verl's and TRL's functions are not timed here: they need their own PyTorch stacks, which an
accelerator runtime may not have (benchmarks/run.py compares against them on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def notebook_source(path: Path) -> str:
  """A notebook's code cells as one script, IPython `%` / `!` lines replaced by `pass`."""
  cells = json.loads(path.read_text())["cells"]
  lines = []
  for cell in cells:
    if cell["cell_type"] != "code":
      continue
    for line in "".join(cell["source"]).splitlines():
      body = line.lstrip()
      indent = line[: len(line) - len(body)]
      lines.append(f"{indent}pass  # {body}" if body.startswith(("%", "!")) else line)
    lines.append("")
  return "\n".join(lines)


def run_notebook(path: Path, *, timeout_s: float) -> dict[str, Any]:
  """Execute a notebook's code in a fresh interpreter; its wall time and status."""
  env = dict(os.environ, MPLBACKEND="Agg",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  start = time.perf_counter()
  try:
    proc = subprocess.run([sys.executable, "-c", notebook_source(path)], cwd=NOTEBOOKS, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"status": f"timed out after {timeout_s:.0f} s", "seconds": timeout_s}
  seconds = time.perf_counter() - start
  if proc.returncode != 0:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"status": "error: " + " | ".join(tail), "seconds": seconds}
  return {"status": "ok", "seconds": seconds}


def device_info() -> dict[str, Any]:
  import jax

  import covrl

  devices = jax.devices()
  return {"backend": jax.default_backend(), "device_kind": devices[0].device_kind,
          "device_count": len(devices), "devices": [str(d) for d in devices],
          "jax": jax.__version__, "covrl": covrl.__version__, "python": sys.version.split()[0]}


def loss_throughput(tokens: int, vocab: int, *, rounds: int) -> dict[str, Any]:
  """covrl's policy losses at `tokens` response tokens and the bonus at [tokens, vocab]."""
  from benchmarks import contestants, inputs

  settings = contestants.Settings()
  batch, time_len = max(1, tokens // 1024), min(tokens, 1024)
  x = inputs.policy_inputs(batch, time_len)
  calls = {name: contestants.covrl_call(name, settings, contestants.policy_data(x))
           for name in ("ppo", "clip_cov", "kl_cov")}
  bonus_batch = max(1, (tokens // 8) // time_len)
  logits, mask = inputs.logits_inputs(bonus_batch, time_len, vocab)
  calls["entropy"] = contestants.covrl_call("entropy", settings, (logits, mask))
  t = common.interleaved(calls, rounds=rounds, target_s=0.01)
  counted = {"ppo": batch * time_len, "clip_cov": batch * time_len, "kl_cov": batch * time_len,
             "entropy": bonus_batch * time_len}
  return {name: {"tokens": counted[name], "timing": t[name].as_dict(),
                 "tokens_per_s": counted[name] / t[name].median} for name in calls}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="reports/gpu", help="folder for gpu.json")
  p.add_argument("--quick", action="store_true",
                 help="small sizes, notebook 01 only, the lab's test size (checks the script)")
  p.add_argument("--notebook-timeout", type=float, default=900.0)
  args = p.parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  import jax

  from benchmarks import transformer

  report: dict[str, Any] = {"device": device_info(), "quick": args.quick}
  print(f"device: {report['device']['device_kind']} x {report['device']['device_count']} "
        f"({report['device']['backend']}), JAX {jax.__version__}", flush=True)

  books = sorted(NOTEBOOKS.glob("0*.ipynb"))
  if args.quick:
    books = books[:1]
  report["notebooks"] = {}
  for path in books:
    print(f"notebook {path.name} ...", flush=True)
    report["notebooks"][path.name] = run_notebook(path, timeout_s=args.notebook_timeout)
    print(f"  {report['notebooks'][path.name]}", flush=True)

  size = "test" if args.quick else "gpu"
  report["transformer"] = transformer.run(size, rounds=3 if args.quick else 5)
  tokens, vocab = (4096, 1024) if args.quick else (262144, 32768)
  report["losses"] = loss_throughput(tokens, vocab, rounds=3 if args.quick else 11)
  (out / "gpu.json").write_text(json.dumps(report, indent=1, default=str))

  print(common.table(["notebook", "status", "time"],
                     [[k, v["status"][:60], common.fmt_time(v["seconds"])]
                      for k, v in report["notebooks"].items()]))
  tr = report["transformer"]
  if "skipped" not in tr:
    print(common.table(["lab step", "time", "tokens/s"],
                       [["rollout", common.fmt_time(tr["rollout"]["median"]),
                         f"{tr['rollout_tokens_per_s']:.3g}"],
                        ["update", common.fmt_time(tr["update"]["median"]),
                         f"{tr['update_tokens_per_s']:.3g}"]]))
  print(common.table(["loss (fwd + bwd)", "tokens", "time", "tokens/s"],
                     [[k, v["tokens"], common.fmt_time(v["timing"]["median"]),
                       f"{v['tokens_per_s']:.3g}"] for k, v in report["losses"].items()]))
  print(f"wrote {out / 'gpu.json'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

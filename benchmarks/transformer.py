"""Transformer lab: tokens per second of the rollout (sampling) and of the update step.

Wired to a hook of the transformer lab, so that the benchmark times exactly what the lab runs:

  covrl.transformer.benchmark_hook(size: str, key) -> dict with
    "rollout":         zero-argument callable: one batch of sampled responses (blocking);
    "rollout_tokens":  int, response tokens generated per rollout call;
    "update":          zero-argument callable: one optimisation step on a fixed batch (blocking);
    "update_tokens":   int, tokens whose loss and gradient one update call computes;
    "description":     str, the model and batch (layers, width, vocabulary, batch, lengths).
  `size` is "small" (the --quick run) or "full".

When covrl.transformer or its hook is missing, the part is skipped with the reason in the table
and the JSON.
"""

from __future__ import annotations

import importlib
from typing import Any

from benchmarks import common


def hook() -> tuple[Any, str]:
  """The lab's benchmark hook, or None and why not."""
  try:
    module = importlib.import_module("covrl.transformer")
  except ImportError as e:
    return None, f"covrl.transformer is not importable ({e}); the transformer lab is not merged"
  fn = getattr(module, "benchmark_hook", None)
  if fn is None:
    return None, ("covrl.transformer has no benchmark_hook(size, key) yet "
                  "(contract in benchmarks/transformer.py)")
  return fn, ""


def run(size: str = "full", *, rounds: int = 5, seed: int = 0, log=print) -> dict[str, Any]:
  fn, why = hook()
  if fn is None:
    log(f"  transformer: skipped: {why}")
    return {"skipped": why}
  import jax

  parts = fn(size, jax.random.key(seed))
  log(f"  transformer ({parts.get('description', size)}): {rounds} interleaved rounds")
  t = common.interleaved({"rollout": parts["rollout"], "update": parts["update"]},
                         rounds=rounds, target_s=0.0, warmup=1)
  return {
      "description": parts.get("description", ""),
      "device": str(jax.devices()[0]),
      "rollout": t["rollout"].as_dict(), "update": t["update"].as_dict(),
      "rollout_tokens_per_s": parts["rollout_tokens"] / t["rollout"].median,
      "update_tokens_per_s": parts["update_tokens"] / t["update"].median,
  }

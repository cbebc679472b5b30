"""Benchmark hooks: tokens per second of the lab's rollout and of its update step.

`benchmark_hook(size, key)` is the contract of `benchmarks/transformer.py`: it returns zero-argument
callables that run (and block on) one rollout and one update of the lab's compiled programs, with
the number of tokens each processes, so an external harness can time them. `benchmark(...)` times
them itself (median of `repeats` calls after compilation).

Rollout tokens are generated response tokens (batch x response length). Update tokens are the
tokens the PPO update runs its forward and backward pass over: batch x (prompt + response - 1) x
epochs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from covrl.transformer.config import GRPOConfig
from covrl.transformer.grpo import get_trainer
from covrl.transformer.lab import LAB_SIZES, lab_config
from covrl.transformer.model import init_params

# The benchmark harness's sizes, as lab sizes.
_HARNESS_SIZES = {"small": "test", "full": "full"}


def benchmark_hook(size: str | GRPOConfig, key: jax.Array) -> dict[str, Any]:
  """One rollout and one update of the lab's GRPO step, as timeable callables.

  Args:
    size: "small" (the lab's test size) or "full" (its full size), any lab size ("test", "fast",
      "full", "gpu"), or a GRPOConfig.
    key: PRNG key.

  Returns:
    dict with "rollout" and "update" (zero-argument callables that block until done),
    "rollout_tokens" and "update_tokens" (tokens each call processes) and "description".
  """
  if isinstance(size, GRPOConfig):
    config = size
  else:
    name = _HARNESS_SIZES.get(size, size)
    if name not in LAB_SIZES:
      raise ValueError(f"size must be one of {sorted(_HARNESS_SIZES)} or {LAB_SIZES}, "
                       f"got {size!r}.")
    config = lab_config(name)
  trainer = get_trainer(config)
  k_params, k_rollout, k_update = jax.random.split(key, 3)
  params = init_params(config.model, k_params)  # throughput does not need the warm start
  state = trainer.init(k_params, params)
  _, _, batch, _ = trainer.batch(params, k_rollout)
  update = jax.jit(trainer._update)
  task, model = config.task, config.model
  return {
      "rollout": lambda: jax.block_until_ready(trainer.rollout(params, k_rollout)),
      "rollout_tokens": config.batch_size * task.response_length,
      "update": lambda: jax.block_until_ready(update(state, batch, k_update)),
      "update_tokens": config.batch_size * (task.context_length - 1) * config.ppo_epochs,
      "description": (f"{model.num_layers} layer{'s' * (model.num_layers != 1)}, width "
                      f"{model.d_model}, vocabulary "
                      f"{model.vocab_size}; {config.batch_size} responses of "
                      f"{task.prompt_length} + {task.response_length} tokens, "
                      f"{config.num_minibatches} mini-batches"),
  }


def _median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
  start = time.perf_counter()
  fn()  # compiles
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  median = float(np.median(times))
  return median, max(0.0, first - median)


def benchmark(size: str | GRPOConfig = "fast", *, repeats: int = 5, seed: int = 0) -> dict:
  """Time the rollout and the update of one GRPO step.

  Args:
    size: as in `benchmark_hook`.
    repeats: timed calls of each part after the first (compiling) one.
    seed: PRNG seed.

  Returns:
    dict with rollout_tokens_per_s, update_tokens_per_s, rollout_seconds, update_seconds,
    compile_seconds, description and device.
  """
  if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
    raise ValueError(f"repeats must be an int >= 1, got {repeats!r}.")
  parts = benchmark_hook(size, jax.random.key(seed))
  rollout_s, rollout_compile = _median_seconds(parts["rollout"], repeats)
  update_s, update_compile = _median_seconds(parts["update"], repeats)
  return {
      "rollout_tokens_per_s": parts["rollout_tokens"] / rollout_s,
      "update_tokens_per_s": parts["update_tokens"] / update_s,
      "rollout_seconds": rollout_s,
      "update_seconds": update_s,
      "compile_seconds": rollout_compile + update_compile,
      "description": parts["description"],
      "device": str(jax.devices()[0].device_kind),
  }

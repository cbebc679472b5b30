"""Benchmark hook: tokens per second of the rollout and of the update, for `covrl bench`.

Rollout tokens are generated response tokens (batch x response length). Update tokens are the
tokens the PPO update runs forward and backward over: batch x (prompt + response - 1) x epochs.
Compilation is timed apart; the throughput is the median over `repeats` timed calls.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from covrl.transformer.config import GRPOConfig
from covrl.transformer.grpo import Trainer
from covrl.transformer.lab import lab_config
from covrl.transformer.model import init_params, num_params


def _timed(fn, args, repeats: int) -> tuple[float, float]:
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_seconds = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return compile_seconds, float(np.median(times))


def benchmark(config: GRPOConfig | str = "fast", *, repeats: int = 5, seed: int = 0) -> dict:
  """Measure rollout and update throughput of one GRPO step.

  Args:
    config: a GRPOConfig, or a lab size name ("test", "fast", "full", "gpu").
    repeats: timed calls of each part (after compilation).
    seed: PRNG seed.

  Returns:
    dict with rollout_tokens_per_s, update_tokens_per_s, rollout_seconds, update_seconds,
    step_seconds, compile_seconds, params, batch, device.
  """
  config = lab_config(config) if isinstance(config, str) else config
  if not isinstance(repeats, int) or repeats < 1:
    raise ValueError(f"repeats must be an int >= 1, got {repeats!r}.")
  trainer = Trainer(config)
  key = jax.random.key(seed)
  params = init_params(config.model, key)  # throughput does not need the warm start
  state = trainer.init(key, params)
  k_rollout, k_update = jax.random.split(jax.random.fold_in(key, 1))
  compile_rollout, rollout_s = _timed(trainer._rollout, (params, k_rollout), repeats)
  _, _, batch, _ = trainer.batch(params, k_rollout)
  compile_update, update_s = _timed(trainer._update, (state, batch, k_update), repeats)
  compile_step, step_s = _timed(trainer._step, (state,), repeats)
  task = config.task
  rollout_tokens = config.batch_size * task.response_length
  update_tokens = config.batch_size * (task.context_length - 1) * config.ppo_epochs
  return {
      "rollout_tokens_per_s": rollout_tokens / rollout_s,
      "update_tokens_per_s": update_tokens / update_s,
      "rollout_seconds": rollout_s,
      "update_seconds": update_s,
      "step_seconds": step_s,
      "compile_seconds": compile_rollout + compile_update + compile_step,
      "params": num_params(params),
      "batch": config.batch_size,
      "device": str(jax.devices()[0].device_kind),
  }

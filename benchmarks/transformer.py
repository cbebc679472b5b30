"""Transformer lab: tokens per second of the rollout (sampling) and of the update step.

`benchmark_hook(size, key)` builds what is timed, from the lab's own compiled programs (so the
benchmark times exactly what the lab runs):

  "rollout":         zero-argument callable: one batch of sampled responses (blocking);
  "rollout_tokens":  int, response tokens generated per rollout call (batch x response length);
  "update":          zero-argument callable: the PPO update of one GRPO step on a fixed batch
                     (blocking);
  "update_tokens":   int, tokens whose loss and gradient one update call computes (batch x
                     (prompt + response - 1) x epochs);
  "description":     str, the model and batch (layers, width, vocabulary, batch, lengths).

`size` is "small" (the --quick run: the lab's test size) or "full" (the lab's full size), any lab
size ("test", "fast", "full", "gpu"), or a GRPOConfig. When covrl.transformer is not importable
(its `transformer` extra missing), the part is skipped with the reason in the table and the JSON.
"""

from __future__ import annotations

from typing import Any

from benchmarks import common

# The benchmark harness's sizes, as lab sizes.
_HARNESS_SIZES = {"small": "test", "full": "full"}


def benchmark_hook(size: Any, key) -> dict[str, Any]:
  """One rollout and one update of the lab's GRPO step, as timeable callables (see above)."""
  import jax

  from covrl.transformer import GRPOConfig, get_trainer, init_params, lab

  if isinstance(size, GRPOConfig):
    config = size
  else:
    name = _HARNESS_SIZES.get(size, size)
    if name not in lab.LAB_SIZES:
      raise ValueError(f"size must be one of {sorted(_HARNESS_SIZES)} or {lab.LAB_SIZES}, "
                       f"got {size!r}.")
    config = lab.lab_config(name)
  trainer = get_trainer(config)
  k_params, k_rollout, k_update = jax.random.split(key, 3)
  params = init_params(config.model, k_params)  # throughput does not need the warm start
  state = trainer.init(k_params, params)
  _, _, batch, _ = trainer.batch(params, k_rollout)
  task, model = config.task, config.model
  return {
      "rollout": lambda: jax.block_until_ready(trainer.rollout(params, k_rollout)),
      "rollout_tokens": config.batch_size * task.response_length,
      "update": lambda: jax.block_until_ready(trainer.update(state, batch, k_update)),
      "update_tokens": config.batch_size * (task.context_length - 1) * config.ppo_epochs,
      "description": (f"{model.num_layers} layer{'s' * (model.num_layers != 1)}, width "
                      f"{model.d_model}, vocabulary "
                      f"{model.vocab_size}; {config.batch_size} responses of "
                      f"{task.prompt_length} + {task.response_length} tokens, "
                      f"{config.num_minibatches} mini-batches"),
  }


def run(size: str = "full", *, rounds: int = 5, seed: int = 0, log=print) -> dict[str, Any]:
  try:
    import covrl.transformer  # noqa: F401
  except ImportError as e:
    why = f"covrl.transformer is not importable ({e}); install covrl[transformer]"
    log(f"  transformer: skipped: {why}")
    return {"skipped": why}
  import jax

  parts = benchmark_hook(size, jax.random.key(seed))
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

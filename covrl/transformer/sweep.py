"""A sweep of control values over seeds: every (control, seed) run of a family in one vmapped
program.

`sweep(config, controls, num_seeds, key)` takes named control values (a method at several
strengths, several methods, constant and annealed coefficients), groups them by control family
(`Trainer.in_family`: one class with its static options) and runs each family's (control, seed)
pairs as one `jax.vmap` of the whole GRPO run, compiled once. Seed s warm-starts from
fold_in(key, s) (the warm starts are shared by every control, so differences between controls
at one seed are paired) and draws its RL randomness from the same key for every control.

The result is a `covrl.transformer.lab.Comparison` labelled by the given names.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import covrl
from covrl.transformer import lab
from covrl.transformer.config import GRPOConfig
from covrl.transformer.grpo import Trainer, get_trainer


def _vmapped_run(trainer: Trainer, num_steps: int):
  cache = trainer.__dict__.setdefault("_vmapped_runs", {})
  if num_steps not in cache:
    cache[num_steps] = jax.jit(jax.vmap(lambda state: trainer.run(state, num_steps)[1]))
  return cache[num_steps]


def sweep(config: GRPOConfig, controls: dict[str, covrl.Control], num_seeds: int,
          key: jax.Array, *, progress: bool = False):
  """Run every named control for `num_seeds` seeds, one vmapped program per control family.

  Args:
    config: the run (its `token_ratio_bound` must cover every selecting control's ratio; its
      own control only picks the first family's Trainer).
    controls: label -> control value (labels appear in the result's tables).
    num_seeds: seeds per control (>= 1).
    key: PRNG key; seed s uses fold_in(key, s) for its warm start and its RL randomness.
    progress: print one line per family.

  Returns:
    lab.Comparison with `labels` the keys of `controls`, metrics [seeds, steps] per label;
    `seconds` holds each family's wall time divided by its runs (compilation included, as the
    runs share it) and `compile_seconds` is 0 (not separated).
  """
  if not controls:
    raise ValueError("controls must not be empty.")
  if isinstance(num_seeds, bool) or not isinstance(num_seeds, int) or num_seeds < 1:
    raise ValueError(f"num_seeds must be an int >= 1, got {num_seeds!r}.")
  families: list[tuple[Trainer, list[str]]] = []
  for label, control in controls.items():
    for trainer, labels in families:
      if trainer.in_family(control):
        trainer.check_control(control)
        labels.append(label)
        break
    else:
      trainer = get_trainer(dataclasses.replace(config, control=control))
      trainer.check_control(control)
      families.append((trainer, [label]))

  start = time.perf_counter()
  seed_keys = [jax.random.fold_in(key, s) for s in range(num_seeds)]
  warm_trainer = families[0][0]
  warm = [jax.block_until_ready(warm_trainer.warm_start(k)) for k in seed_keys]
  warm_seconds = time.perf_counter() - start

  metrics: dict[str, dict[str, np.ndarray]] = {}
  seconds: dict[str, np.ndarray] = {}
  for trainer, labels in families:
    start = time.perf_counter()
    states = [trainer.init(k, params, control=controls[label])
              for label in labels for k, params in zip(seed_keys, warm)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    out = jax.block_until_ready(_vmapped_run(trainer, config.num_steps)(stacked))
    elapsed = time.perf_counter() - start
    for i, label in enumerate(labels):
      rows = slice(i * num_seeds, (i + 1) * num_seeds)
      metrics[label] = {name: np.asarray(v[rows]) for name, v in out.items()}
      seconds[label] = np.full(num_seeds, elapsed / len(states))
    if progress:
      print(f"{type(controls[labels[0]]).__name__}: {len(states)} runs in {elapsed:.1f}s",
            flush=True)
  labels = list(controls)
  return lab.Comparison(labels, {k: metrics[k] for k in labels}, {k: seconds[k] for k in labels},
                        0.0, warm_seconds, config)

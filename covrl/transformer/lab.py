"""The transformer lab's standard setting, and a comparison of control methods over seeds.

`lab_config(size)` is the setting the claims, the notebook and the benchmarks share::

  test   a 1-layer, width-32 model on Sort(6, 3), 60 steps at Adam 2e-3 (unit tests, seconds);
  fast   a 2-layer, width-64 model on Sort(8, 4), 16 prompts x 8 responses, 4 mini-batches,
         Adam 3e-4, 64 steps after a 200-step warm start (CI);
  full   the same for 240 steps (the report);
  gpu    a 4-layer, width-256 model on Sort(16, 8) with 64 prompts x 16 responses and KV-cache
         sampling, 600 steps (for an accelerator).

The "fork-" sizes are the regime of Cui et al.'s covariance mechanism (THEORY.md T5.1): ForkCopy
(32 symbols to copy; at one fork position the answer is the copy on COPY prompts and the shifted
symbol on the quarter of SHIFT prompts), after a warm start whose demonstrator takes the trap
(copies) at the fork with probability 0.7 whatever the mode. Almost every response token is a
near-deterministic copy, the fork decides the reward, greedy decoding is wrong on the SHIFT
prompts while sampling still solves them, and a collapse onto the copy caps the reward near 0.75;
mini-batches hold thousands of response tokens::

  fork-test  a 1-layer, width-16 model, 8 prompts x 4 responses, 8 steps (unit tests, seconds);
  fork-fast  a 1-layer, width-32 model, 16 prompts x 8 responses (2 mini-batches of 2048 tokens),
             80 steps after a 300-step warm start (CI);
  fork-full  the same with 32 prompts x 8 responses (2 mini-batches of 4096 tokens), 120 steps
             after a 400-step warm start (the report);
  fork-gpu   a 2-layer, width-128 model on 64-token responses, 128 prompts x 16 responses (8
             mini-batches of 16384 tokens), 400 steps (for an accelerator; not yet run).

`lab_methods(num_steps)` lists the controls compared (covrl control values), with the paper's
hyperparameters where it gives them (Cui et al. 2025): Clip-Cov r = 2e-4, band (1, 5); KL-Cov
k = 2e-3, beta = 1; an entropy bonus of 1e-2 (the paper's "explodes" setting) constant and
annealed; clip-higher 0.2 / 0.28; KL-Cov with beta annealed. The batches here are small, so the
paper's fractions select the minimum of one token per mini-batch (verl's count
max(floor(ratio N), 1)).

`compare(config, methods, seeds, key)` runs every method from the same warm start per seed (the
warm start varies with the seed), with one compiled program per control family (a constant and
an annealed coefficient of the same method share one).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

import covrl
from covrl import schedules
from covrl.transformer import tasks
from covrl.transformer.config import GRPOConfig
from covrl.transformer.grpo import Trainer, get_trainer
from covrl.transformer.model import ModelConfig
from covrl.transformer.sft import SFTConfig

LAB_SIZES: tuple[str, ...] = ("test", "fast", "full", "gpu", "fork-test", "fork-fast", "fork-full",
                              "fork-gpu")
# Two-sided 95% Student t quantiles by degrees of freedom (NumPy has no t distribution).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}
# One-sided 95% quantiles, for paired differences against the uncontrolled run.
_T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860,
        9: 1.833, 10: 1.812, 15: 1.753, 20: 1.725, 30: 1.697}


def _check_size(size: str) -> None:
  if size not in LAB_SIZES:
    raise ValueError(f"size must be one of {LAB_SIZES}, got {size!r}.")


def lab_config(size: str = "fast") -> GRPOConfig:
  """The lab's GRPO setting at a size ("test", "fast", "full", "gpu", or a "fork-" size)."""
  _check_size(size)
  if size.startswith("fork-"):
    return _fork_config(size)
  if size == "test":
    task = tasks.Sort(num_symbols=6, length=3)
    model = ModelConfig(task.vocab_size, task.context_length, num_layers=1, d_model=32,
                        num_heads=2)
    return GRPOConfig(task, model, num_steps=60, prompts_per_step=16, group_size=8,
                      num_minibatches=2, learning_rate=2e-3, token_ratio_bound=0.05,
                      sft=SFTConfig(num_steps=60, batch_size=32))
  if size == "gpu":
    task = tasks.Sort(num_symbols=16, length=8)
    model = ModelConfig(task.vocab_size, task.context_length, num_layers=4, d_model=256,
                        num_heads=8)
    return GRPOConfig(task, model, num_steps=600, prompts_per_step=64, group_size=16,
                      num_minibatches=8, learning_rate=1e-4, token_ratio_bound=0.05,
                      kv_cache=True, sft=SFTConfig(num_steps=2000, batch_size=256))
  task = tasks.Sort(num_symbols=8, length=4)
  model = ModelConfig(task.vocab_size, task.context_length, num_layers=2, d_model=64,
                      num_heads=4)
  return GRPOConfig(task, model, num_steps=64 if size == "fast" else 240, prompts_per_step=16,
                    group_size=8, num_minibatches=4, learning_rate=3e-4, token_ratio_bound=0.05,
                    sft=SFTConfig(num_steps=200, batch_size=64))


def _fork_config(size: str) -> GRPOConfig:
  """The covariance-mechanism regime (module docstring) at a "fork-" size."""
  if size == "fork-gpu":
    task = tasks.ForkCopy(num_symbols=16, length=64, num_forks=1, shift_prob=0.25,
                          trap_prob=0.7)
    model = ModelConfig(task.vocab_size, task.context_length, num_layers=2, d_model=128,
                        num_heads=4)
    return GRPOConfig(task, model, num_steps=400, prompts_per_step=128, group_size=16,
                      num_minibatches=8, learning_rate=3e-4, token_ratio_bound=0.05,
                      kv_cache=True, diagnostics=True,
                      sft=SFTConfig(num_steps=2000, batch_size=256, noise=0.01))
  task = tasks.ForkCopy(num_symbols=8, length=32, num_forks=1, shift_prob=0.25, trap_prob=0.7)
  width = 16 if size == "fork-test" else 32
  model = ModelConfig(task.vocab_size, task.context_length, num_layers=1, d_model=width,
                      num_heads=2)
  if size == "fork-test":
    return GRPOConfig(task, model, num_steps=8, prompts_per_step=8, group_size=4,
                      num_minibatches=2, learning_rate=1e-3, token_ratio_bound=0.05,
                      kv_cache=True, diagnostics=True,
                      sft=SFTConfig(num_steps=40, batch_size=32, noise=0.01))
  prompts, steps, sft_steps = (16, 80, 300) if size == "fork-fast" else (32, 120, 400)
  return GRPOConfig(task, model, num_steps=steps, prompts_per_step=prompts, group_size=8,
                    num_minibatches=2, learning_rate=1e-3, token_ratio_bound=0.05,
                    kv_cache=True, diagnostics=True,
                    sft=SFTConfig(num_steps=sft_steps, batch_size=128, noise=0.01))


def lab_num_seeds(size: str) -> int:
  """Seeds per method in the comparison."""
  _check_size(size)
  return {"test": 3, "fast": 2, "full": 4, "gpu": 4, "fork-test": 2, "fork-fast": 2,
          "fork-full": 2, "fork-gpu": 4}[size]


def lab_methods(num_steps: int) -> tuple[covrl.Control, ...]:
  """The controls compared; annealed coefficients decay as 1 / (1 + t / (num_steps / 10)).

  Their labels (`Control.label`): none, entropy, entropy_annealed, clip_higher, clip_cov,
  kl_cov, kl_cov_annealed.
  """
  offset = max(1.0, num_steps / 10)
  return (
      covrl.NoControl(),
      covrl.EntropyBonus(1e-2),
      covrl.EntropyBonus(schedules.inverse_time(1e-2, offset)),
      covrl.ClipHigher(clip_ratio_low=0.2, clip_ratio_high=0.28),
      covrl.ClipCov(clip_cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0),
      covrl.KLCov(kl_cov_ratio=2e-3, ppo_kl_coef=1.0),
      covrl.KLCov(kl_cov_ratio=2e-3, ppo_kl_coef=schedules.inverse_time(1.0, offset)),
  )


@dataclasses.dataclass
class Comparison:
  """Metrics of every (method, seed) run.

  Attributes:
    labels: one label per method (Control.label).
    metrics: label -> metric name -> [seeds, steps] array.
    seconds: label -> [seeds] wall time of each run, compilation excluded (a family's first
      run, which compiled its program, is given the median time of the family's other runs).
    compile_seconds: the first runs' times minus that median, summed over the control families:
      compiling the programs (about 0 for a family whose Trainer had compiled it before).
    warm_start_seconds: time of the supervised warm starts (all seeds).
    config: the run's config.
  """

  labels: list[str]
  metrics: dict[str, dict[str, np.ndarray]]
  seconds: dict[str, np.ndarray]
  compile_seconds: float
  warm_start_seconds: float
  config: GRPOConfig

  def final(self, label: str, name: str, frac: float = 0.1) -> np.ndarray:
    """[seeds] mean of metric `name` over the last `frac` of the steps."""
    values = self.metrics[label][name]
    tail = max(1, round(frac * values.shape[1]))
    return values[:, -tail:].mean(axis=1)

  def paired(self, label: str, name: str, base: str = "none") -> tuple[float, float]:
    """Mean over seeds of final `name` of `label` minus `base` (same seed: same warm start and
    RL key), and its one-sided 95% lower bound."""
    diff = self.final(label, name) - self.final(base, name)
    return float(diff.mean()), paired_lower95(diff)

  def table(self) -> list[dict[str, Any]]:
    """One row per method: final reward and entropy (means, 95% t-intervals), tokens touched,
    clip fraction and wall time per run."""
    rows = []
    for label in self.labels:
      reward, entropy = self.final(label, "reward"), self.final(label, "entropy")
      rows.append({
          "method": label,
          "final_reward": float(reward.mean()), "final_reward_ci95": ci95(reward),
          "final_entropy": float(entropy.mean()), "final_entropy_ci95": ci95(entropy),
          "touched_frac": float(self.metrics[label]["touched_frac"].mean()),
          "clip_frac": float(self.metrics[label]["clip_frac"].mean()),
          "seconds_per_run": float(self.seconds[label].mean()),
      })
    return rows


def paired_lower95(values: np.ndarray) -> float:
  """One-sided 95% Student t lower bound of the mean of paired differences (nan for n < 2)."""
  values = np.asarray(values, np.float64)
  n = values.size
  if n < 2:
    return float("nan")
  t = _T95[max(k for k in _T95 if k <= n - 1)]
  return float(values.mean() - t * values.std(ddof=1) / np.sqrt(n))


def ci95(values: np.ndarray) -> float:
  """Half-width of the 95% Student t interval of the mean (nan for fewer than 2 values)."""
  values = np.asarray(values, np.float64)
  n = values.size
  if n < 2:
    return float("nan")
  df = n - 1
  t = _T975[max(k for k in _T975 if k <= df)]
  return float(t * values.std(ddof=1) / np.sqrt(n))


def compare(
    config: GRPOConfig,
    methods: tuple[covrl.Control, ...],
    num_seeds: int,
    key: jax.Array,
    *,
    trainer: Trainer | None = None,
    progress: bool = False,
) -> Comparison:
  """Run every method for `num_seeds` seeds; one warm start per seed, shared by the methods.

  The methods run in one compiled program per control family (`Trainer.check_control`): each
  family's Trainer is `trainer` when the family is its config's, else `get_trainer(config with
  the family's first method)`.

  Args:
    config: the run; its `token_ratio_bound` must cover every method's ratio.
    methods: the controls to compare (covrl control values with distinct labels).
    num_seeds: seeds per method.
    key: PRNG key; seed s uses fold_in(key, s) for its warm start and its RL randomness.
    trainer: reuse a Trainer built for `config`.
    progress: print one line per finished run.

  Returns:
    Comparison.
  """
  trainer = get_trainer(config) if trainer is None else trainer
  if trainer.config != config:
    raise ValueError("trainer was built for a different config.")
  trainers: list[Trainer] = [trainer]
  chosen = []
  for m in methods:
    found = next((t for t in trainers if t.in_family(m)), None)
    if found is None:
      found = get_trainer(dataclasses.replace(config, control=m))
      trainers.append(found)
    found.check_control(m)  # raises with the reason
    chosen.append(found)
  labels = [m.label for m in methods]
  if len(set(labels)) != len(labels):
    raise ValueError(f"methods need distinct labels, got {labels}.")
  start = time.perf_counter()
  seed_keys = [jax.random.fold_in(key, s) for s in range(num_seeds)]
  warm = [jax.block_until_ready(trainer.warm_start(k)) for k in seed_keys]
  warm_seconds = time.perf_counter() - start

  metrics: dict[str, dict[str, list]] = {label: {} for label in labels}
  seconds: dict[str, list] = {label: [] for label in labels}
  for m, label, runner in zip(methods, labels, chosen):
    for s, (k, params) in enumerate(zip(seed_keys, warm)):
      state = runner.init(k, params, control=m)
      start = time.perf_counter()
      _, out = jax.block_until_ready(runner.run(state, config.num_steps))
      seconds[label].append(time.perf_counter() - start)
      for name, values in out.items():
        metrics[label].setdefault(name, []).append(np.asarray(values))
      if progress:
        print(f"{label} seed {s}: reward {float(out['reward'][-1]):.3f} entropy "
              f"{float(out['entropy'][-1]):.3f} ({seconds[label][-1]:.1f}s)", flush=True)
  # The first run of each family compiled its program (unless it had been before). Its run
  # time is estimated by the median of the family's other runs (same program, same shapes), and
  # the rest is compilation; a family of one run is timed again instead.
  compile_seconds = 0.0
  for t in trainers:
    runs = [(label, s) for label, c in zip(labels, chosen) if c is t
            for s in range(num_seeds)]
    if not runs:
      continue
    label0 = runs[0][0]
    first = seconds[label0][0]
    if len(runs) > 1:
      run_only = float(np.median([seconds[label][s] for label, s in runs[1:]]))
    else:
      i = labels.index(label0)
      start = time.perf_counter()
      jax.block_until_ready(t.run(t.init(seed_keys[0], warm[0], control=methods[i]),
                                  config.num_steps))
      run_only = time.perf_counter() - start
    seconds[label0][0] = min(first, run_only)
    compile_seconds += max(0.0, first - run_only)
  return Comparison(
      labels,
      {label: {k: np.stack(v) for k, v in per.items()} for label, per in metrics.items()},
      {label: np.asarray(v) for label, v in seconds.items()},
      compile_seconds, warm_seconds, config,
  )


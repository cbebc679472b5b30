"""The runs the exact-network claims read: a transformer on an enumerable tree trained with exact
expected updates (covrl.transformer.exact), cached per size and seed.

  continuation  both bonus forms from one random network, alpha lowered stage by stage (T2.tf
                reads the grid, T3.4.tf the whole annealing); its end is the common
                near-optimal start;
  method_runs   every method of covrl.METHODS from that start, at its presets, at 10x and
                (Clip-Cov, KL-Cov) annealed: one program, every run vmapped (T3.4.tf, T3.5.tf).

The step sizes are part of the protocol, chosen so that training reaches what the claims
compare (proofs/T2_entropy_bonus_bias.md#T2.tf, proofs/T3_covariance_control.md#T3.4.tf).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import covrl
from covrl import schedules
from covrl.experiments.claims import _util as u
from covrl.experiments.claims import exact_references as ref
from covrl.transformer import exact, tree

# T2.tf's grid, and the annealing's continuation below it (T3.4.tf); its end is the common
# near-optimal start of T3.3.tf-T3.5.tf.
ALPHAS = (0.3, 0.1, 0.03, 0.01)
TAIL = (0.003,)
# Adam's peak step size at a stage of alpha: stage_lr(alpha) = min(2e-3, alpha / 15). Adam moves
# every parameter by about its step size whatever the gradient, while what holds the policy at
# the stationary point scales with alpha: at 2e-3 the stages at 0.01 and 0.003 flipped a
# prompt's answer in some runs (3 of 8 at 0.003; proofs/T2_entropy_bonus_bias.md#T2.tf). Every
# run from the near-optimal start takes NEAR_LR (constant after a warm-up).
MAX_LR, NEAR_LR = 2e-3, 1e-4


def stage_lr(alpha: float) -> float:
  """Adam's peak step size for a stage of the continuation at `alpha`."""
  return min(MAX_LR, alpha / 15)


@dataclasses.dataclass(frozen=True)
class Setting:
  """The tree, the network, the step budgets and the methods of one claim size."""

  task: tree.TreeTask
  width: int
  stage_steps: int      # steps per alpha of the continuation (alpha ramped in the first half)
  near_steps: int       # runs from the common near-optimal start
  methods: tuple[str, ...]  # the methods run from the near-optimal start

  def config(self, control: Any = None, *, steps: int, learning_rate: float, warmup: int,
             ppo_epochs: int = 1, return_entropy: Any = 0.0) -> exact.ExactConfig:
    return exact.ExactConfig(
        self.task, self.task.model_config(d_model=self.width, num_heads=4),
        control=covrl.NoControl() if control is None else control,
        return_entropy=return_entropy, num_steps=steps, learning_rate=learning_rate,
        warmup=warmup, ppo_epochs=ppo_epochs)


def setting(size: str) -> Setting:
  """Full: 8 prompts x 64 responses (V = 8, T = 2), width 32. The smaller sizes shrink the tree
  (4 prompts), the network (width 16) and the budgets, and "test" runs only the methods its
  criteria read; the thresholds are the same."""
  full = tree.TreeTask(num_prompts=8, prompt_length=2, response_length=2, num_tokens=8)
  small = tree.TreeTask(num_prompts=4, prompt_length=1, response_length=2, num_tokens=8)
  every = tuple(covrl.METHODS)
  return u.pick(size,
                Setting(small, 16, 1500, 600, ("none", "entropy", "clip_cov", "kl_cov")),
                Setting(small, 16, 2000, 600, every),
                Setting(full, 32, 2000, 600, every))


def stack(*trees):
  """Pytrees of the same structure stacked leaf by leaf (float32): a batch to vmap over."""
  return jax.tree.map(lambda *x: jnp.stack([jnp.asarray(v, jnp.float32) for v in x]), *trees)


def member(tree_, i):
  """Member i of a stacked pytree."""
  return jax.tree.map(lambda x: x[i], tree_)


@functools.lru_cache(maxsize=4)
def _forms_program(size: str):
  """The two bonus forms, vmapped: form a (entropy in the return) and form b (verl's bonus)."""
  s = setting(size)
  ramp = schedules.GeometricRamp(0.1, 0.1, s.stage_steps // 2)
  config = s.config(covrl.EntropyBonus(ramp), steps=s.stage_steps, learning_rate=MAX_LR,
                    warmup=150, return_entropy=ramp)
  train = exact.make_train(config)
  run = jax.jit(jax.vmap(lambda p, c, r, refs, lr: train(p, control=c, return_entropy=r,
                                                          references=refs, learning_rate=lr),
                         in_axes=(0, 0, 0, None, None)))
  return config, run


def _forms(size: str, params, start: float, alpha: float, lr: float):
  """One stage: both forms from `params` ([2, ...]), alpha ramped from `start` to `alpha`."""
  s = setting(size)
  config, run = _forms_program(size)
  ramp = lambda a, b: schedules.GeometricRamp(a, b, s.stage_steps // 2)
  controls = stack(covrl.EntropyBonus(ramp(0.0, 0.0)), covrl.EntropyBonus(ramp(start, alpha)))
  returns = stack(ramp(start, alpha), ramp(0.0, 0.0))
  refs = jnp.asarray(np.stack(ref.references(s.task, alpha)), jnp.float32)
  params, metrics = run(params, controls, returns, refs, jnp.float32(lr))
  return config, params, metrics


@functools.lru_cache(maxsize=4)
def continuation(size: str, seed: int) -> dict:
  """Both bonus forms from one random network, alpha lowered stage by stage over ALPHAS + TAIL
  (each stage ramps alpha geometrically from the previous value over its first half, then holds
  it), evaluated in float64 after every stage; and, at full size, the small alphas of the grid
  from the random network with the budget of one stage. Cached per size and seed: T2.tf reads
  the grid, T3.4.tf the whole annealing, T3.3.tf and T3.5.tf start from form b's end."""
  config, _ = _forms_program(size)
  init = exact.init(config, jax.random.key(seed))
  params = jax.tree.map(lambda x: jnp.stack([x, x]), init)
  out = {"config": config, "stages": [], "init_nodes": exact.node_log_probs(config, init)}
  previous = ALPHAS[0]
  for alpha in ALPHAS + TAIL:
    _, params, metrics = _forms(size, params, previous, alpha, stage_lr(alpha))
    previous = alpha
    out["stages"].append({
        "alpha": alpha,
        "nodes": [exact.node_log_probs(config, member(params, i)) for i in range(2)],
        "kl_curve": np.asarray(metrics["kl_to_reference"]),  # [2 forms, steps, 2 refs]
        "gap_curve": np.asarray(metrics["gap"])})
  out["near_start"] = member(params, 1)  # verl's bonus annealed to TAIL[-1]
  out["scratch"] = {}
  if size == "full":  # the smallest alpha from the random network, both forms, one stage's budget
    alpha = ALPHAS[-1]
    fresh = jax.tree.map(lambda x: jnp.stack([x, x]), init)
    _, fresh, _ = _forms(size, fresh, alpha, alpha, stage_lr(alpha))
    out["scratch"][alpha] = [exact.node_log_probs(config, member(fresh, i)) for i in range(2)]
  out["steps_per_stage"] = setting(size).stage_steps
  return out


def near_start(size: str, seed: int) -> dict:
  """The common near-optimal start: verl's bonus at the end of the annealing (`continuation`)."""
  runs = continuation(size, seed)
  task = setting(size).task
  return {"config": runs["config"], "params": runs["near_start"],
          "final_gap": float(ref.gaps(task.rewards, tree.response_log_probs(
              task, runs["stages"][-1]["nodes"][1])).mean())}


def method_strengths() -> dict[str, tuple[Any, Any]]:
  """Each method of covrl.METHODS at its presets and at 10x, as (control, strong control).

  10x multiplies a method's dose, its strength's distance from the value that switches it off
  (0 for coefficients and ratios; 1 for forking tokens' quantile, W-REINFORCE's weight and
  STEER's floor; 0.2 for clip-higher's upper bound), clipped to the field's range. Fixed before
  any run; the adaptive bonus at a fixed coefficient is its controller's largest, 5e-3.
  """
  return {
      "none": (covrl.NoControl(), None),
      "entropy": (covrl.EntropyBonus.paper_explodes(), covrl.EntropyBonus(0.1)),
      "clip_higher": (covrl.ClipHigher(), covrl.ClipHigher(clip_ratio_high=1.0)),
      "clip_cov": (covrl.ClipCov(), covrl.ClipCov(clip_cov_ratio=2e-3)),
      "kl_cov": (covrl.KLCov.paper_7b(), covrl.KLCov(kl_cov_ratio=2e-3, ppo_kl_coef=10.0)),
      "forking_tokens": (covrl.ForkingTokens(), covrl.ForkingTokens(top_entropy_quantile=0.0)),
      "entropy_advantage": (covrl.EntropyAdvantage(), covrl.EntropyAdvantage(alpha=4.0)),
      "w_reinforce": (covrl.WReinforce(), covrl.WReinforce(positive_advantage_weight=0.0)),
      "steer": (covrl.STEER(), covrl.STEER(token_weight_min=0.01)),
      "adaptive_entropy": (covrl.AdaptiveEntropyBonus(entropy_coeff=5e-3),
                           covrl.AdaptiveEntropyBonus(entropy_coeff=5e-2, entropy_coef_max=5e-2)),
  }


def _schedulable(value: covrl.Control, power: float, offset: float) -> covrl.Control:
  """`value` with its strength as a PowerDecay (power 0: constant), so that every run of a
  method has one pytree structure; clip-higher's bound is not schedulable and stays a number."""
  if value.strength is None or isinstance(value, covrl.ClipHigher):
    return value
  return value.with_strength(schedules.PowerDecay(float(getattr(value, value.strength)), power,
                                                  offset))


@functools.lru_cache(maxsize=4)
def _methods_program(size: str):
  """One program for every method of the size's list: a `lax.switch` on the method, vmapped."""
  s = setting(size)
  names = s.methods
  menu = tuple(_schedulable(method_strengths()[n][0], 0.0, 1.0) for n in names)
  config = dataclasses.replace(
      s.config(menu, steps=s.near_steps, learning_rate=NEAR_LR, warmup=100, ppo_epochs=2),
      cosine=False)
  train = exact.make_train(config)
  run = jax.jit(jax.vmap(lambda p, menu, m: train(p, control=menu, method=m),
                         in_axes=(None, 0, 0)))
  return names, config, run


@functools.lru_cache(maxsize=4)
def method_runs(size: str, seed: int) -> dict:
  """Every method from the common near-optimal start, Adam (NEAR_LR after a warm-up of 100, then
  constant), two epochs per exact rollout: at its presets, at 10x, and (Clip-Cov, KL-Cov)
  annealed from 10x as 1 / (1 + t / t0). One program, every run vmapped (`lax.switch` on the
  method)."""
  s = setting(size)
  start = near_start(size, seed)
  names, config, run = _methods_program(size)
  base = [_schedulable(method_strengths()[n][0], 0.0, 1.0) for n in names]
  offset = s.near_steps / 30
  labels, menus, index = [], [], []
  for i, name in enumerate(names):
    preset, strong = method_strengths()[name]
    variants = [("preset", _schedulable(preset, 0.0, 1.0))]
    if strong is not None:
      variants.append(("10x", _schedulable(strong, 0.0, 1.0)))
    if name in ("clip_cov", "kl_cov"):
      variants.append(("annealed", _schedulable(strong, 1.0, offset)))
    for tag, value in variants:
      menu = list(base)
      menu[i] = value
      labels.append((name, tag))
      menus.append(tuple(menu))
      index.append(i)
  params, metrics = run(start["params"], stack(*menus), jnp.asarray(index, jnp.int32))
  out = {}
  for r, label in enumerate(labels):
    logp = exact.response_log_probs(config, member(params, r))
    out[label] = {"gap": float(ref.gaps(s.task.rewards, logp).mean()),
                  "gap_curve": np.asarray(metrics["gap"][r]),
                  "touched": float(np.mean(metrics["touched_frac"][r])),
                  "entropy": float(np.asarray(metrics["final"]["response_entropy"][r]))}
  out["start_gap"] = start["final_gap"]
  out["steps"] = s.near_steps
  return out

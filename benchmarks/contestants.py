"""The two sides of the loss benchmark: covrl's jitted losses and verl's PyTorch ones.

Each side is built once on fixed inputs and returns a zero-argument callable that computes the
loss and its gradient (with respect to log pi for the policy losses, to the logits for the
entropy bonus) and blocks until both are ready:

  covrl  jax.jit(jax.value_and_grad(loss, has_aux=True)) on device arrays;
  verl   verl.trainer.ppo.core_algos.compute_policy_loss_{vanilla,clip_cov,kl_cov} and, for the
         entropy bonus, -coef * agg_loss(entropy_from_logits(logits), ...), on torch tensors made
         from the same NumPy arrays, then `loss.backward()`.

verl's losses read their hyperparameters from an `ActorConfig` (verl.workers.config); the real
class is built here (strategy "fsdp", one rollout, a micro-batch size) with a `PolicyLossConfig`
and the `global_batch_info` verl's trainer fills in (dp_size, batch_num_tokens,
global_batch_size).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import covrl
from benchmarks.inputs import LossInputs

LOSS_AGG_MODES = covrl.LOSS_AGG_MODES
POLICY_LOSSES = ("ppo", "clip_cov", "kl_cov")
LOSSES = (*POLICY_LOSSES, "entropy")
VERL_NAMES = {
    "ppo": "compute_policy_loss_vanilla",
    "clip_cov": "compute_policy_loss_clip_cov",
    "kl_cov": "compute_policy_loss_kl_cov",
    "entropy": "agg_loss(entropy_from_logits(logits))",
}


@dataclasses.dataclass(frozen=True)
class Settings:
  """Hyperparameters shared by both sides (verl's defaults unless stated).

  kl_coef is verl's PolicyLossConfig.ppo_kl_coef default (0.1); verl's loss function falls back
  to 1.0 only when the config field is None, so it is passed explicitly to both sides.
  """

  clip_ratio: float = 0.2
  clip_ratio_c: float = 3.0
  clip_cov_ratio: float = 2e-4
  clip_cov_lb: float = 1.0
  clip_cov_ub: float = 5.0
  kl_cov_ratio: float = 2e-4
  kl_coef: float = 0.1
  entropy_coef: float = 0.01
  loss_agg_mode: str = "token-mean"


# ----------------------------------------------------------------------------------------------
# covrl


def covrl_policy_loss(name: str, s: Settings, *, selection: str = "global",
                      micro_batch_size: int | None = None, axis_name: str | None = None
                      ) -> Callable:
  """(key, old, log_prob, adv, mask) -> (loss, metrics), with s's hyperparameters.

  `axis_name`: the shard_map axis when called per device (benchmarks.sharded).
  """
  common = {"loss_agg_mode": s.loss_agg_mode, "axis_name": axis_name}
  if name == "ppo":
    return lambda key, old, lp, adv, mask: covrl.ppo_loss(
        old, lp, adv, mask, clip_ratio=s.clip_ratio, clip_ratio_c=s.clip_ratio_c, **common)
  local = {"selection": selection, "micro_batch_size": micro_batch_size}
  if name == "clip_cov":
    return lambda key, old, lp, adv, mask: covrl.clip_cov_loss(
        old, lp, adv, mask, key=key, clip_ratio=s.clip_ratio, clip_cov_ratio=s.clip_cov_ratio,
        clip_cov_lb=s.clip_cov_lb, clip_cov_ub=s.clip_cov_ub, **local, **common)
  if name == "kl_cov":
    return lambda key, old, lp, adv, mask: covrl.kl_cov_loss(
        old, lp, adv, mask, kl_cov_ratio=s.kl_cov_ratio, ppo_kl_coef=s.kl_coef, **local, **common)
  raise ValueError(f"unknown policy loss {name!r}; choose one of {POLICY_LOSSES}.")


# The metrics verl's functions compute (and return with .item()), by covrl name: the
# like-for-like comparison returns these; covrl's other metrics are then never computed (jit
# removes unused outputs). "all" returns every covrl metric.
VERL_METRICS = {
    "ppo": ("clip_frac", "ppo_kl", "clip_frac_lower"),
    "clip_cov": ("selected_frac", "ppo_kl"),
    "kl_cov": ("ppo_kl",),
    "entropy": ("entropy",),
}


def covrl_value_and_grad(name: str, s: Settings, *, metrics: str = "verl", **kwargs) -> Callable:
  """Jitted (arrays...) -> (loss, grad, metrics): grad wrt log_prob, or wrt logits ("entropy").

  `metrics="verl"` returns the metrics verl computes (VERL_METRICS), `"all"` every covrl metric;
  the returned ones are computed, as a training loop that logs them would.
  """
  if metrics not in ("verl", "all"):
    raise ValueError(f"metrics must be 'verl' or 'all', got {metrics!r}.")
  keep = (lambda m: m) if metrics == "all" else (
      lambda m: {k: m[k] for k in VERL_METRICS[name]})
  if name == "entropy":
    def loss(logits, mask):
      return covrl.entropy_bonus_loss(logits, mask, coef=s.entropy_coef,
                                      loss_agg_mode=s.loss_agg_mode)
    vg = jax.value_and_grad(loss, has_aux=True)
    return jax.jit(lambda logits, mask: _flat(vg(logits, mask), keep))
  fn = covrl_policy_loss(name, s, **kwargs)
  vg = jax.value_and_grad(lambda lp, key, old, adv, mask: fn(key, old, lp, adv, mask),
                          has_aux=True)
  return jax.jit(lambda key, old, lp, adv, mask: _flat(vg(lp, key, old, adv, mask), keep))


def _flat(out, keep=lambda m: m):
  (value, metrics), grad = out
  return value, grad, keep(metrics)


def covrl_call(name: str, s: Settings, data: Any, seed: int = 0, **kwargs) -> Callable:
  """Zero-argument callable running covrl's loss and gradient on `data` (blocking)."""
  fn = covrl_value_and_grad(name, s, **kwargs)
  if name == "entropy":
    logits, mask = (jnp.asarray(a) for a in data)
    return lambda: jax.block_until_ready(fn(logits, mask))[:2]
  key = jax.random.key(seed)
  arrays = [jnp.asarray(a) for a in data]
  return lambda: jax.block_until_ready(fn(key, *arrays))[:2]


# ----------------------------------------------------------------------------------------------
# verl


def verl_available() -> tuple[bool, str]:
  """Whether torch and verl's loss functions import here, and why not."""
  try:
    import torch  # noqa: F401
    from verl.trainer.ppo import core_algos  # noqa: F401
    from verl.utils.torch_functional import entropy_from_logits  # noqa: F401
    from verl.workers.config import ActorConfig  # noqa: F401
  except Exception as e:  # ImportError, or a broken dependency chain inside verl
    return False, f"{type(e).__name__}: {e}"
  return True, ""


def verl_versions() -> dict[str, str]:
  import torch
  import verl

  return {"torch": torch.__version__, "verl": verl.__version__,
          "torch_threads": torch.get_num_threads(),
          "torch_interop_threads": torch.get_num_interop_threads()}


def verl_config(name: str, s: Settings, global_batch_info: dict, micro_batch_size: int) -> Any:
  """verl's own ActorConfig with the settings of `s` (see the module docstring)."""
  from verl.workers.config import ActorConfig
  from verl.workers.config.actor import PolicyLossConfig

  loss_mode = {"ppo": "vanilla", "clip_cov": "clip_cov", "kl_cov": "kl_cov"}.get(name, "vanilla")
  policy_loss = PolicyLossConfig(
      loss_mode=loss_mode, clip_cov_ratio=s.clip_cov_ratio, clip_cov_lb=s.clip_cov_lb,
      clip_cov_ub=s.clip_cov_ub, kl_cov_ratio=s.kl_cov_ratio, ppo_kl_coef=s.kl_coef)
  return ActorConfig(
      strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=micro_batch_size,
      clip_ratio=s.clip_ratio, clip_ratio_low=s.clip_ratio, clip_ratio_high=s.clip_ratio,
      clip_ratio_c=s.clip_ratio_c, policy_loss=policy_loss, loss_agg_mode=s.loss_agg_mode,
      entropy_coeff=s.entropy_coef, global_batch_info=dict(global_batch_info))


def verl_call(name: str, s: Settings, data: Any, micro_batch_size: int | None = None
              ) -> Callable[[], tuple[float, np.ndarray]]:
  """Zero-argument callable: verl's loss and gradient on `data`, micro-batch by micro-batch.

  With `micro_batch_size`, verl's loss runs on each group of rows with global_batch_info giving
  the whole batch's token and sequence counts (as verl's trainer does for gradient
  accumulation), and the gradients accumulate in one leaf tensor. Returns (loss summed over
  micro-batches, gradient as a torch tensor).
  """
  import torch
  from verl.trainer.ppo import core_algos
  from verl.utils.torch_functional import entropy_from_logits

  if name == "entropy":
    logits_np, mask_np = data
  else:
    old_np, lp_np, adv_np, mask_np = data
  batch = mask_np.shape[0]
  mbs = batch if micro_batch_size is None else micro_batch_size
  info = {"dp_size": 1, "batch_num_tokens": int(mask_np.sum()),
          "global_batch_size": int((mask_np.sum(-1) > 0).sum())}
  config = verl_config(name, s, info, mbs)
  rows = [slice(i, i + mbs) for i in range(0, batch, mbs)]
  mask = torch.from_numpy(mask_np)

  if name == "entropy":
    leaf = torch.from_numpy(logits_np).requires_grad_(True)

    def loss_of(r):
      ent = entropy_from_logits(leaf[r])
      ent_loss = core_algos.agg_loss(loss_mat=ent, loss_mask=mask[r],
                                     loss_agg_mode=s.loss_agg_mode, **config.global_batch_info)
      return -config.entropy_coeff * ent_loss  # verl: policy_loss -= entropy_coeff * entropy
  else:
    fn = getattr(core_algos, VERL_NAMES[name])
    old, adv = torch.from_numpy(old_np), torch.from_numpy(adv_np)
    leaf = torch.from_numpy(lp_np).requires_grad_(True)

    def loss_of(r):
      loss, _ = fn(old[r], leaf[r], adv[r], mask[r], loss_agg_mode=s.loss_agg_mode,
                   config=config)
      return loss

  def call():
    leaf.grad = None
    total = 0.0
    for r in rows:
      loss = loss_of(r)
      loss.backward()
      total += loss.detach()
    return total, leaf.grad

  return call


def as_numpy(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):
    x = x.detach().numpy()
  return np.asarray(x)


def policy_data(x: LossInputs) -> tuple[np.ndarray, ...]:
  return (x.old_log_prob, x.log_prob, x.advantages, x.response_mask)

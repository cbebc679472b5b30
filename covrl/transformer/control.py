"""Entropy-control methods for the GRPO loop, as configuration and as traced arrays.

A `Control` names a method and its hyperparameters:

  none         PPO clipped surrogate (clip 0.2 both sides), verl's default.
  entropy      the same plus an entropy bonus -alpha H (alpha a number or an annealing schedule).
  clip_higher  PPO with a wider upper clip (DAPO: 0.2 / 0.28).
  clip_cov     Clip-Cov: detach a random fraction r of the tokens in the covariance band (lb, ub).
  kl_cov       KL-Cov: penalise the top fraction k of tokens by covariance with
               beta |log pi - log pi_old|, beta a number or an annealing schedule; no clipping.

The training step reads the method and its numbers as arrays (`ControlArrays`), not as Python
constants, so one compiled program runs every method: a comparison of all methods over several
seeds compiles once, and methods or coefficients can be vmapped as a sweep. Only the size of the
token-selection buffer is static (`GRPOConfig.token_ratio_bound`).

References:
  Yu et al., DAPO (clip-higher), arXiv:2503.14476 (2025).
  Cui et al., The Entropy Mechanism of RL for Reasoning LMs (Clip-Cov, KL-Cov), arXiv:2505.22617.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from covrl import schedules

Method = Literal["none", "entropy", "clip_higher", "clip_cov", "kl_cov"]
METHODS: tuple[str, ...] = ("none", "entropy", "clip_higher", "clip_cov", "kl_cov")
Coefficient = float | schedules.PowerDecay


def check_number(name: str, value: Any, *, low: float = 0.0, strict: bool = False) -> None:
  """Raise ValueError unless `value` is a finite real number >= low (> low when strict)."""
  ok = isinstance(value, int | float) and not isinstance(value, bool)
  ok = ok and value < float("inf") and (value > low if strict else value >= low)
  if not ok:
    raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, "
                     f"got {value!r}.")


@dataclasses.dataclass(frozen=True)
class Control:
  """An entropy-control method and its hyperparameters.

  Attributes:
    method: "none", "entropy", "clip_higher", "clip_cov" or "kl_cov".
    coef: entropy bonus alpha ("entropy") or KL-Cov beta ("kl_cov"): a number, or a
      `covrl.schedules.PowerDecay` over GRPO steps (annealed).
    ratio: fraction of valid tokens Clip-Cov detaches (r) or KL-Cov penalises (k), in (0, 1].
    clip_ratio_low, clip_ratio_high: PPO clip range (KL-Cov uses no clipping).
    clip_cov_lb, clip_cov_ub: Clip-Cov's open covariance band.
  """

  method: Method = "none"
  coef: Coefficient = 0.0
  ratio: float = 0.0
  clip_ratio_low: float = 0.2
  clip_ratio_high: float = 0.2
  clip_cov_lb: float = 1.0
  clip_cov_ub: float = 5.0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"unknown control method {self.method!r}; choose one of {METHODS}.")
    if not isinstance(self.coef, schedules.PowerDecay):
      check_number("coef", self.coef)
    if isinstance(self.ratio, bool) or not (isinstance(self.ratio, int | float)
                                            and 0 <= self.ratio <= 1):
      raise ValueError(f"ratio must be a fraction in [0, 1], got {self.ratio!r}.")
    check_number("clip_ratio_low", self.clip_ratio_low)
    if self.clip_ratio_low >= 1:
      raise ValueError(f"clip_ratio_low must be < 1, got {self.clip_ratio_low!r}.")
    check_number("clip_ratio_high", self.clip_ratio_high)
    check_number("clip_cov_lb", self.clip_cov_lb, low=-float("inf"))
    check_number("clip_cov_ub", self.clip_cov_ub, low=-float("inf"))
    if not self.clip_cov_lb < self.clip_cov_ub:
      raise ValueError(f"Clip-Cov needs clip_cov_lb < clip_cov_ub, got {self.clip_cov_lb!r}, "
                       f"{self.clip_cov_ub!r}.")
    if self.method not in ("entropy", "kl_cov") and self.coef_max != 0:
      raise ValueError(f"method {self.method!r} takes no coef (got {self.coef!r}).")
    if self.method in ("clip_cov", "kl_cov") and self.ratio == 0:
      raise ValueError(f"method {self.method!r} needs a token ratio > 0.")
    if self.method not in ("clip_cov", "kl_cov") and self.ratio != 0:
      raise ValueError(f"method {self.method!r} takes no token ratio (got {self.ratio!r}).")
    if self.method == "clip_higher" and not self.clip_ratio_high > self.clip_ratio_low:
      raise ValueError("clip_higher needs clip_ratio_high > clip_ratio_low.")

  @property
  def coef_max(self) -> float:
    if isinstance(self.coef, schedules.PowerDecay):
      return self.coef.max_value
    return float(self.coef)

  @property
  def annealed(self) -> bool:
    return isinstance(self.coef, schedules.PowerDecay) and self.coef.power > 0

  @property
  def label(self) -> str:
    """Short name for tables: the method, with "_annealed" for a decaying coefficient."""
    return self.method + ("_annealed" if self.annealed else "")

  def arrays(self) -> ControlArrays:
    """The method and its numbers as arrays (what the compiled step reads)."""
    sched = schedules.as_power_decay(self.coef)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return ControlArrays(
        method=jnp.asarray(METHODS.index(self.method), jnp.int32),
        coef=f32(sched.init_value), coef_power=f32(sched.power), coef_offset=f32(sched.offset),
        ratio=f32(self.ratio), clip_ratio_low=f32(self.clip_ratio_low),
        clip_ratio_high=f32(self.clip_ratio_high), clip_cov_lb=f32(self.clip_cov_lb),
        clip_cov_ub=f32(self.clip_cov_ub),
    )


class ControlArrays(NamedTuple):
  """A `Control` as scalar arrays; the coefficient is coef * (1 + t / coef_offset)^-coef_power."""

  method: jax.Array
  coef: jax.Array
  coef_power: jax.Array
  coef_offset: jax.Array
  ratio: jax.Array
  clip_ratio_low: jax.Array
  clip_ratio_high: jax.Array
  clip_cov_lb: jax.Array
  clip_cov_ub: jax.Array

  def coef_at(self, step: jax.Array) -> jax.Array:
    """The coefficient at GRPO step `step`."""
    t = jnp.asarray(step, jnp.float32)
    return self.coef * (1.0 + t / self.coef_offset) ** (-self.coef_power)

  def is_method(self, name: str) -> jax.Array:
    return self.method == METHODS.index(name)


def no_control() -> Control:
  """Plain GRPO/PPO (clip 0.2 both sides)."""
  return Control("none")


def entropy_bonus(coef: Coefficient) -> Control:
  """PPO plus an entropy bonus alpha H; alpha a number or a PowerDecay schedule (annealed)."""
  return Control("entropy", coef=coef)


def clip_higher(clip_ratio_low: float = 0.2, clip_ratio_high: float = 0.28) -> Control:
  """PPO with the upper clip raised (DAPO's 0.2 / 0.28)."""
  return Control("clip_higher", clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high)


def clip_cov(ratio: float = 2e-4, lb: float = 1.0, ub: float = 5.0) -> Control:
  """Clip-Cov with detach fraction r and band (lb, ub) (the paper's values: 2e-4, (1, 5))."""
  return Control("clip_cov", ratio=ratio, clip_cov_lb=lb, clip_cov_ub=ub)


def kl_cov(ratio: float = 2e-3, coef: Coefficient = 1.0) -> Control:
  """KL-Cov with top fraction k and coefficient beta (the paper's 7B values: 2e-3, 1)."""
  return Control("kl_cov", ratio=ratio, coef=coef)

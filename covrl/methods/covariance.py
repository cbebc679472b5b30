"""Covariance-based control (Cui et al. 2025): Clip-Cov and KL-Cov.

References:
  Cui et al., The Entropy Mechanism of RL for Reasoning LMs (Clip-Cov, KL-Cov), arXiv:2505.22617.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp

from covrl import _checks
from covrl import schedules as sch
from covrl import selection as sel
from covrl.covariance import masked_mean
from covrl.methods.base import (
    Control,
    PPOClip,
    check_coefficient,
    check_count_options,
    check_ratio,
    register,
)
from covrl.tokens import Surrogate, ratio

Scope = Literal["global", "local"]
Band = Literal["absolute", "relative"]


class CovarianceSelection:
  """Options shared by Clip-Cov and KL-Cov: the count and the scope of the selection (the loss
  applies `selection` and `micro_batch_size`: covrl.losses.select_tokens)."""

  def _count_bound(self, ratio_value: Any) -> float | None:
    return self.max_ratio if self.max_ratio is not None else sch.upper_bound(ratio_value)


def covariance_spread(cov: jax.Array, valid: jax.Array, axis_name: str | None = None
                      ) -> jax.Array:
  """The standard deviation of c_i over the valid tokens (global with `axis_name`; 0 when
  there are none). Clip-Cov's relative band is measured in this unit."""
  mean = masked_mean(cov, valid, axis_name)
  var = masked_mean(jnp.square(cov - mean), valid, axis_name)
  return jnp.sqrt(jnp.maximum(var, 0.0))


@register("clip_cov", static=("min_count", "max_ratio", "selection", "micro_batch_size",
                              "band"))
class ClipCov(Control, PPOClip, CovarianceSelection):
  """Clip-Cov: PPO with a random few high-covariance tokens detached (zero loss and gradient).

  Tokens are candidates when valid, not already clipped by PPO, and clip_cov_lb < c_i <
  clip_cov_ub (c_i the pooled covariance, Cui et al. Eq. 10); max(floor(clip_cov_ratio *
  N_valid), min_count) of them are drawn uniformly and get zero loss. There is no dual clip (as
  in the reference). The defaults are verl's, which are also the paper's.

  verl's band is absolute: c_i scales with the advantages, so rescaling them (std-normalised
  GRPO against Dr. GRPO's unnormalised ones, or a reward in other units) moves tokens in or out
  of (1, 5) and changes the selection, where KL-Cov's top-k does not change. With
  band="relative" the band is (lb s, ub s), s the standard deviation of c_i over the valid tokens
  (`covariance_spread`, over the same tokens the selection sees), and the selection is
  invariant under any positive rescaling of the advantages.

  Attributes:
    clip_cov_ratio: fraction of valid tokens to detach, in [0, 1] (verl: 2e-4); the strength.
    clip_cov_lb, clip_cov_ub: the open band, lb < ub (verl: 1 and 5); in units of c_i, or of
      its spread with band="relative".
    clip_ratio, clip_ratio_low, clip_ratio_high: PPO's clip range (verl: 0.2).
    min_count: least number of tokens detached (verl: 1; 0 lets an annealed ratio reach 0).
    max_ratio: static bound on a traced or scheduled ratio (None: the ratio's own bound).
    selection: "global" (exact over the whole batch, any number of devices) or "local" (verl's:
      per group of micro_batch_size rows, per device under shard_map).
    micro_batch_size: rows per group in local mode (None: this call's whole batch).
    band: "absolute" (verl's, the default) or "relative" (the band scales with the spread of
      c_i; see above).
  """

  clip_cov_ratio: Any = 2e-4
  clip_cov_lb: Any = 1.0
  clip_cov_ub: Any = 5.0
  clip_ratio: Any = 0.2
  clip_ratio_low: Any = None
  clip_ratio_high: Any = None
  min_count: int = 1
  max_ratio: float | None = None
  selection: Scope = "global"
  micro_batch_size: int | None = None
  band: Band = "absolute"

  strength: ClassVar[str] = "clip_cov_ratio"
  needs_key: ClassVar[bool] = True
  selects_tokens: ClassVar[bool] = True
  ratio_field: ClassVar[str] = "clip_cov_ratio"

  def __post_init__(self):
    if self.clip_ratio is None:
      raise ValueError("Clip-Cov excludes the tokens PPO's clip clips: it needs a clip_ratio.")
    self._check_clip()
    check_count_options(self)
    if self.band not in ("absolute", "relative"):
      raise ValueError(f"band must be 'absolute' or 'relative', got {self.band!r}.")
    check_ratio("clip_cov_ratio", self.clip_cov_ratio, self.max_ratio)
    lb, ub = (_checks.concrete_float(v) for v in (self.clip_cov_lb, self.clip_cov_ub))
    if lb is not None and ub is not None and not lb < ub:
      raise ValueError(f"Clip-Cov needs lb < ub, got clip_cov_lb={lb!r}, clip_cov_ub={ub!r}.")

  @classmethod
  def paper(cls) -> ClipCov:
    """Cui et al.'s setting (also verl's default): ratio 2e-4, band (1, 5)."""
    return cls()

  def surrogate(self, tokens):
    return self._ppo_surrogate(tokens, dual=False)

  def select(self, tokens, cov, surrogate, *, key=None, step=None, axis_name=None,
             row_offset=0):
    lb, ub = self.clip_cov_lb, self.clip_cov_ub
    if self.band == "relative":
      spread = covariance_spread(cov, tokens.valid, axis_name)
      lb, ub = lb * spread, ub * spread
    # As in the reference, tokens the PPO clip already clips are not candidates.
    return sel.clip_cov_select(
        cov, tokens.valid, key=key, ratio=self.value_of("clip_cov_ratio", step),
        lb=lb, ub=ub, eligible=~(surrogate.clipped & tokens.valid),
        min_count=self.min_count, max_ratio=self._count_bound(self.clip_cov_ratio),
        axis_name=axis_name, row_offset=row_offset, weights=tokens.weight)

  def loss_change(self, tokens, surrogate, selection, *, step=None, axis_name=None):
    return sel.on_selected(selection, -surrogate.loss)  # detached: zero loss and gradient

  def ppo_kl_terms(self, tokens):
    return tokens.old_log_prob - tokens.log_prob  # verl's clip_cov: mean(-log r), unclamped

  def touched(self, tokens, surrogate, selection):
    return selection.mask

  def check_call(self, *, key, step, has_logits, has_selected, has_weights=False):
    del has_logits
    if key is None and not (has_selected or has_weights):
      raise ValueError("Clip-Cov draws its tokens at random: pass a PRNG key as key= (or a "
                       "precomputed selection as selected=).")
    if key is not None:
      sel.check_key(key)
    if callable(self.clip_cov_ratio) and step is None and not has_selected:
      raise ValueError("clip_cov_ratio is a schedule: pass the optimisation step as `step=`.")


@jax.custom_jvp
def abs_zero_grad_at_zero(x: jax.Array) -> jax.Array:
  """`|x|` whose derivative at 0 is 0 (sign(x)), as PyTorch's autograd gives.

  jnp.abs has derivative 1 at 0 in JAX; KL-Cov's penalty `beta |log pi - log pi_old|` would then
  push on a purely on-policy step, where the reference does nothing (THEORY.md T3.3, T3.6).
  """
  return jnp.abs(x)


@abs_zero_grad_at_zero.defjvp
def _abs_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return jnp.abs(x), jnp.sign(x) * dx


@register("kl_cov", static=("min_count", "max_ratio", "selection", "micro_batch_size"))
class KLCov(Control, CovarianceSelection):
  """KL-Cov: unclipped policy gradient plus a KL penalty on the top-covariance tokens.

  Per token, l = -A r, and for the max(floor(kl_cov_ratio * N_valid), min_count) valid tokens
  with the largest c_i, l += `ppo_kl_coef * |log pi - log pi_old|`. There is no ratio clipping. The
  derivative of `|x|` at 0 is taken as 0 (as in the PyTorch reference), so on a purely on-policy
  step the penalty has no effect; it acts from the second PPO epoch or mini-batch on (THEORY.md
  T3.6). The defaults are verl's configuration; `paper_7b` and `paper_32b` are Cui et al.'s.

  Attributes:
    kl_cov_ratio: fraction of valid tokens penalised, in [0, 1] (verl: 2e-4).
    ppo_kl_coef: penalty coefficient beta >= 0 or a schedule (verl: 0.1); the strength.
    min_count, max_ratio, selection, micro_batch_size: as in `ClipCov`.
  """

  kl_cov_ratio: Any = 2e-4
  ppo_kl_coef: Any = 0.1
  min_count: int = 1
  max_ratio: float | None = None
  selection: Scope = "global"
  micro_batch_size: int | None = None

  strength: ClassVar[str] = "ppo_kl_coef"
  selects_tokens: ClassVar[bool] = True
  coefficient_field: ClassVar[str] = "ppo_kl_coef"
  ratio_field: ClassVar[str] = "kl_cov_ratio"

  def __post_init__(self):
    check_count_options(self)
    check_ratio("kl_cov_ratio", self.kl_cov_ratio, self.max_ratio)
    check_coefficient("ppo_kl_coef", self.ppo_kl_coef)

  @classmethod
  def paper_7b(cls) -> KLCov:
    """Cui et al.'s setting for Qwen2.5-7B: kl_cov_ratio 2e-3, ppo_kl_coef 1."""
    return cls(kl_cov_ratio=2e-3, ppo_kl_coef=1.0)

  @classmethod
  def paper_32b(cls) -> KLCov:
    """Cui et al.'s setting for Qwen2.5-32B: kl_cov_ratio 2e-4, ppo_kl_coef 1."""
    return cls(kl_cov_ratio=2e-4, ppo_kl_coef=1.0)

  def surrogate(self, tokens):
    return Surrogate(-tokens.advantages * ratio(tokens), None, None)

  def select(self, tokens, cov, surrogate, *, key=None, step=None, axis_name=None,
             row_offset=0):
    del surrogate, key, row_offset
    return sel.kl_cov_select(
        cov, tokens.valid, ratio=self.value_of("kl_cov_ratio", step),
        min_count=self.min_count, max_ratio=self._count_bound(self.kl_cov_ratio),
        axis_name=axis_name, weights=tokens.weight)

  def loss_change(self, tokens, surrogate, selection, *, step=None, axis_name=None):
    beta = self.strength_at(step)
    penalty = beta * abs_zero_grad_at_zero(tokens.log_prob - tokens.old_log_prob)
    return sel.on_selected(selection, penalty)

  def touched(self, tokens, surrogate, selection):
    return selection.mask

  def ppo_kl_terms(self, tokens):
    return jnp.abs(tokens.log_prob - tokens.old_log_prob)  # verl's kl_cov: mean |log r|

  def check_call(self, *, key, step, has_logits, has_selected, has_weights=False):
    del has_weights, key, has_logits
    if (callable(self.ppo_kl_coef) or (callable(self.kl_cov_ratio) and not has_selected)) and (
        step is None):
      raise ValueError("KL-Cov's coefficient or ratio is a schedule: pass the optimisation "
                       "step as `step=`.")

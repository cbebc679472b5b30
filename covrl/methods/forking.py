"""Forking tokens (Wang et al. 2025): the policy gradient only on the highest-entropy tokens.

`high_entropy_select` is the selection and `ForkingTokens` the control value. The threshold is
torch.quantile's (linear interpolation) of the valid tokens' entropies at q = 1 - rho, and a
token is kept when its entropy is >= the threshold, as TRL's `get_high_entropy_mask`:

  sort the N valid entropies ascending: s_0 <= ... <= s_{N-1};
  r = q (N - 1) in the entropies' dtype (float32 for float32 entropies, as torch computes it),
  lo = floor(r), hi = ceil(r), w = r - lo,
  threshold = s_lo + w (s_hi - s_lo) if w < 1/2 else s_hi - (1 - w) (s_hi - s_lo)  (torch.lerp),
  keep = valid & (H >= threshold).

Global scope (the default) ranks the whole batch: under jit on one or many devices, or inside
`shard_map` with `axis_name`, where every device gathers the batch's entropies (one number per
token) and sorts them, so the threshold and the kept tokens are those of one device. Local scope
(`selection="local"`, `micro_batch_size`) takes the quantile per group of rows of this device's
shard, as EasyDeL does per mini-batch; TRL gathers the entropies of one micro-batch over its
processes, which is covrl's global scope on one process (and, per micro-batch, its local scope
with `micro_batch_size`). Gradient accumulation with the global threshold: select once on the
whole batch and pass each micro-batch its rows as `selected=`.

A weighted population (`weights`: one share per row) is the limit of a batch in which row b
occurs in proportion to its weight. There the interpolated rank q (N - 1) falls inside the run of
copies of the least entropy h with F(h) > q (F the weighted distribution function of the valid
entropies), or, when F(h) = q exactly, between h and the next entropy: either way the kept tokens
are those whose entropy has F(H) > q (the highest entropy alone at q = 1), whole atoms, so the
kept weight can exceed rho W at a tie, as the kept count can in a batch.

Exactness: with float32 entropies the threshold is torch's to its last bit except where
PyTorch's CPU kernel fuses the interpolation's multiply-add (one rounding fewer); the kept set
differs only if a valid entropy lies within that last bit of the threshold (measured: 0 of
30,000 random cases with ties and one-ulp near-ties; tests/test_trl_parity.py).

References:
  S. Wang et al., Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective
  Reinforcement Learning for LLM Reasoning, arXiv:2506.01939 (2025).
  TRL (huggingface/trl 1.16), GRPOConfig.top_entropy_quantile and
  GRPOTrainer.get_high_entropy_mask.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
from jax import lax

from covrl import _checks, _compat
from covrl import schedules as sch
from covrl import selection as sel
from covrl.covariance import finite_tokens
from covrl.methods.base import Control, PPOClip, register

Scope = Literal["global", "local"]


def entropy_threshold(entropy: jax.Array, valid: jax.Array, q: Any, *,
                      axis_name: str | None = None) -> jax.Array:
  """The q-quantile of the valid entropies with torch.quantile's linear interpolation.

  Args:
    entropy: [...] entropies (any shape; the whole batch, or this device's shard).
    valid: [...] bool, the tokens that count.
    q: the quantile in [0, 1] (a number or a traced scalar).
    axis_name: shard_map axis over which the batch is split: the quantile is then global.

  Returns:
    [] the threshold in the entropies' dtype (+inf when no token is valid).
  """
  flat = jnp.where(valid, entropy, jnp.inf).reshape(-1)
  flat = _compat.unsharded(flat)
  if axis_name is not None:
    flat = lax.all_gather(flat, axis_name).reshape(-1)
  if flat.size == 0:  # an empty batch (B or T = 0): no valid token
    return jnp.full((), jnp.inf, flat.dtype)
  ordered = jnp.sort(flat)  # the invalid (+inf) ones last
  n = jnp.sum(jnp.isfinite(ordered), dtype=jnp.int32)
  dtype = ordered.dtype
  # As torch: the rank q (N - 1) is one multiplication in the entropies' dtype.
  rank = jnp.asarray(q, dtype) * jnp.maximum(n - 1, 0).astype(dtype)
  lo = jnp.floor(rank)
  w = rank - lo
  lo_i = lo.astype(jnp.int32)
  hi_i = jnp.minimum(jnp.ceil(rank).astype(jnp.int32), jnp.maximum(n - 1, 0))
  a, b = ordered[lo_i], ordered[hi_i]
  span = b - a
  value = jnp.where(w < 0.5, a + w * span, b - span * (1.0 - w))  # torch.lerp's two forms
  return jnp.where(n > 0, value, jnp.inf)


def weighted_quantile(values: jax.Array, weight: jax.Array, q: Any) -> jax.Array:
  """The limit of the interpolated sample q-quantile over a weighted population: the least value
  v with F(v) > q, F the weighted distribution function (tokens of weight 0 are not in it), or
  the largest value when there is none (q = 1); +inf when the population is empty.

  F(v) is compared with q with a margin of 1e-6 of the total weight, so that a step of F that
  equals q in exact arithmetic counts as equal despite the round-off of the cumulative sum.
  """
  flat, w = values.reshape(-1), weight.reshape(-1)
  if flat.size == 0:
    return jnp.full((), jnp.inf, flat.dtype)
  inside = w > 0
  order = jnp.argsort(jnp.where(inside, flat, jnp.inf))  # the population first, ascending
  v, cum = flat[order], jnp.cumsum(jnp.where(inside, w, 0.0)[order])
  total = cum[-1]
  above = (cum > (q + 1e-6) * total) & inside[order]
  last = jnp.maximum(jnp.sum(inside) - 1, 0)  # the largest value in the population
  value = jnp.where(jnp.any(above), v[jnp.argmax(above)], v[last])
  return jnp.where(total > 0, value, jnp.inf)


def high_entropy_select(
    entropy: jax.Array,
    response_mask: jax.Array,
    *,
    top_entropy_quantile: float | jax.Array,
    axis_name: str | None = None,
    weights: jax.Array | None = None,
) -> sel.Selection:
  """The valid tokens whose entropy is >= the (1 - top_entropy_quantile)-quantile (TRL's rule).

  Args:
    entropy: [B, T] per-token entropies (detached; `covrl.entropy` of the logits).
    response_mask: [B, T] 0/1 or bool.
    top_entropy_quantile: rho in [0, 1], the fraction of tokens kept (TRL's keyword; 1 keeps
      every valid token, 0 only the highest-entropy ones).
    axis_name: shard_map axis the batch is split over, for the exact global threshold.
    weights: optional [B] population shares of the rows: the threshold is the weighted
      population quantile (see the module docstring); not with `axis_name`.

  Returns:
    Selection(mask, count): the kept tokens and their number in this array (this device's shard
    under shard_map). Ties at the threshold are all kept, so the count can exceed rho N. With
    `weights` the count is the kept weight.

  Example:
    >>> import jax.numpy as jnp, covrl
    >>> h = jnp.array([[0.1, 2.0, 0.5, 1.5, 0.3]])
    >>> covrl.high_entropy_select(h, jnp.ones((1, 5)), top_entropy_quantile=0.4).mask
    Array([[False,  True, False,  True, False]], dtype=bool)
  """
  _checks.check_same_shape(("entropy", "response_mask"), (entropy, response_mask), rank=2)
  _checks.check_fraction("top_entropy_quantile", top_entropy_quantile)
  mask = _checks.as_mask("response_mask", response_mask)
  h = lax.stop_gradient(_checks.upcast(_checks.check_float_array("entropy", entropy)))
  valid = finite_tokens(mask, h)
  if weights is not None:
    if axis_name is not None:
      raise ValueError("a weighted population's selection runs on the whole batch under jit, "
                       "not per device in shard_map (axis_name).")
    w = _checks.check_weights(weights, valid.shape[0]).astype(h.dtype)
    weight = jnp.where(valid & (w[:, None] > 0), w[:, None], 0.0)
    q = 1.0 - jnp.asarray(top_entropy_quantile, h.dtype)
    keep = (weight > 0) & (h >= weighted_quantile(h, weight, q))
    return sel.Selection(keep, jnp.sum(jnp.where(keep, weight, 0.0)))
  rho = _checks.concrete_float(top_entropy_quantile)
  # TRL passes 1 - rho, computed in Python (float64), to torch.quantile.
  q = 1.0 - rho if rho is not None else 1.0 - jnp.asarray(top_entropy_quantile, h.dtype)
  threshold = entropy_threshold(h, valid, q, axis_name=axis_name)
  keep = valid & (h >= threshold)
  return sel.Selection(keep, jnp.sum(keep, dtype=jnp.int32))


@register("forking_tokens", static=("selection", "micro_batch_size"))
class ForkingTokens(Control, PPOClip):
  """Forking tokens: PPO's loss on the highest-entropy fraction rho of tokens, zero elsewhere.

  The kept tokens are `high_entropy_select`'s (TRL's quantile and `>=` rule, exact over the
  global batch by default); the others get zero loss and gradient but still count in the
  aggregation's denominator (as in the paper's objective and TRL, where the mask multiplies the
  token loss). The entropy of a token is the full-vocabulary entropy of the current policy at
  its position (the loss's `logits=` or `entropy=`), detached. The default rho = 0.2 is the
  paper's (TRL's keyword top_entropy_quantile, whose default 1.0 is off); the paper trains
  DAPO, i.e. clip_ratio_high=0.28 (`paper()`); the other PPO fields are verl's.

  Attributes:
    top_entropy_quantile: rho in [0, 1], the fraction of tokens kept; the strength (1: off).
      A number, a traced scalar or a schedule `step -> rho`.
    clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c: the PPO loss, as `NoControl`.
    selection: "global" (exact over the whole batch, any number of devices) or "local" (per
      group of micro_batch_size rows, per device under shard_map).
    micro_batch_size: rows per group in local mode (None: this call's whole batch).
  """

  top_entropy_quantile: Any = 0.2
  clip_ratio: Any = 0.2
  clip_ratio_low: Any = None
  clip_ratio_high: Any = None
  clip_ratio_c: Any = 3.0
  selection: Scope = "global"
  micro_batch_size: int | None = None

  strength: ClassVar[str] = "top_entropy_quantile"
  ranges: ClassVar[dict[str, sch.Range]] = {"top_entropy_quantile": sch.FRACTION}
  selects_tokens: ClassVar[bool] = True
  needs_entropy: ClassVar[bool] = True

  def __post_init__(self):
    if not callable(self.top_entropy_quantile):
      _checks.check_fraction("top_entropy_quantile", self.top_entropy_quantile)
    self._check_clip()
    if self.selection not in ("global", "local"):
      raise ValueError(f"selection must be 'global' or 'local', got {self.selection!r}.")
    mbs = self.micro_batch_size
    if mbs is not None:
      if self.selection != "local":
        raise ValueError("micro_batch_size only applies to selection='local'.")
      _checks.check_int("micro_batch_size", mbs, 1)

  @classmethod
  def paper(cls) -> ForkingTokens:
    """Wang et al.'s setting: rho = 0.2 on DAPO's loss (clip_ratio_low 0.2, high 0.28)."""
    return cls(top_entropy_quantile=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28)

  def surrogate(self, tokens):
    return self._ppo_surrogate(tokens, dual=True)

  def select(self, tokens, cov, surrogate, *, key=None, step=None, axis_name=None,
             row_offset=0):
    del cov, surrogate, key, row_offset
    rho = self.value_of("top_entropy_quantile", step)
    return high_entropy_select(tokens.entropy, tokens.valid, top_entropy_quantile=rho,
                               axis_name=axis_name, weights=tokens.weight)

  def loss_change(self, tokens, surrogate, selection, *, step=None, axis_name=None):
    return jnp.where(tokens.valid & ~selection.mask, -surrogate.loss, 0.0)

  def touched(self, tokens, surrogate, selection):
    return tokens.valid & ~selection.mask  # the tokens whose gradient is removed

  def check_call(self, *, key, step, has_logits, has_selected, has_weights=False):
    del has_weights, key, has_logits
    if callable(self.top_entropy_quantile) and step is None and not has_selected:
      raise ValueError("top_entropy_quantile is a schedule: pass the optimisation step as "
                       "`step=`.")

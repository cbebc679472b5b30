"""Reducing a [batch, time] loss matrix to a scalar, as verl's `agg_loss` does.

Each mode is a ratio numerator / denominator::

  | mode                    | numerator                                  | denominator          |
  |-------------------------|--------------------------------------------|----------------------|
  | token-mean              | sum of valid token losses                  | valid tokens         |
  | token-sum               | sum of valid token losses                  | 1                    |
  | seq-mean-token-sum      | sum over sequences of their token sums     | non-empty sequences  |
  | seq-mean-token-mean     | sum over sequences of their token means    | non-empty sequences  |
  | seq-mean-token-sum-norm | sum over sequences of token sums / horizon | non-empty sequences  |

The numerator is additive over any split of the batch by rows, so gradient accumulation is exact
when every micro-batch divides its own numerator by the denominator of the whole batch: compute
that once (`denominator(mask, mode)` on the full mask) and pass it as `denominator=`. Under
`shard_map` pass `axis_name` instead: the denominator is then summed over devices, and the
per-device losses (and gradients) add up to the global ones.

A weighted population (`weights`, one share w_b per row) weights every row's terms: each sum
over tokens or sequences becomes a sum of w_b times the term, as if row b occurred in proportion
to w_b (the expected loss over the population).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from covrl import _checks

LossAggMode = Literal[
    "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
]
LOSS_AGG_MODES: tuple[str, ...] = (
    "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)


class Aggregate(NamedTuple):
  """A reduced loss: `value = numerator / max(denominator, 1)`, 0 for an empty batch."""

  value: jax.Array
  numerator: jax.Array
  denominator: jax.Array


def check_mode(mode: str) -> None:
  if mode not in LOSS_AGG_MODES:
    raise ValueError(f"unknown loss_agg_mode {mode!r}; choose one of {LOSS_AGG_MODES}.")


def _sequence_terms(loss_mat, mask, mode, horizon, weights=None):
  if mode in ("token-mean", "token-sum"):
    if weights is not None:
      loss_mat = loss_mat * weights[:, None]
    return jnp.sum(jnp.where(mask, loss_mat, 0.0))
  seq_sum = jnp.sum(jnp.where(mask, loss_mat, 0.0), axis=-1)
  if mode == "seq-mean-token-mean":
    seq_sum = seq_sum / jnp.maximum(jnp.sum(mask, axis=-1), 1)
  elif mode == "seq-mean-token-sum-norm":
    # T = 0 (an empty time axis) divides a zero sum by 1, not by 0.
    seq_sum = seq_sum / (max(loss_mat.shape[-1], 1) if horizon is None else horizon)
  if weights is not None:
    seq_sum = seq_sum * weights
  return jnp.sum(seq_sum)


def denominator(response_mask: jax.Array, mode: str = "token-mean", axis_name=None, *,
                weights: jax.Array | None = None) -> jax.Array:
  """The denominator `aggregate` divides by, for the given mask (pass the whole batch's).

  With `weights` ([B] row shares) the counts are weighted: the total weight of the valid tokens
  (token-mean) or of the non-empty rows (the seq-mean modes).
  """
  check_mode(mode)
  mask = _checks.as_mask("response_mask", response_mask)
  if mode == "token-sum":
    return jnp.ones((), jnp.float32)
  if weights is not None:
    weights = _checks.check_weights(weights, mask.shape[0])
    weights = jnp.where(weights > 0, weights, 0.0)
    if mode == "token-mean":
      count = jnp.sum(jnp.where(mask, weights[:, None], 0.0))
    else:
      count = jnp.sum(jnp.where(jnp.any(mask, axis=-1), weights, 0.0))
  elif mode == "token-mean":
    count = jnp.sum(mask, dtype=jnp.float32)
  else:
    count = jnp.sum(jnp.any(mask, axis=-1), dtype=jnp.float32)
  return count if axis_name is None else lax.psum(count, axis_name)


def aggregate(
    loss_mat: jax.Array,
    response_mask: jax.Array,
    mode: LossAggMode = "token-mean",
    *,
    denominator_override: jax.Array | float | None = None,
    horizon: int | float | None = None,
    axis_name: str | None = None,
    weights: jax.Array | None = None,
) -> Aggregate:
  """Reduce a [B, T] token loss to a scalar by `mode` (see the module docstring).

  Args:
    loss_mat: [B, T] per-token loss. Values at masked positions are ignored, NaN included.
    response_mask: [B, T] 0/1 or bool.
    mode: one of LOSS_AGG_MODES (verl's names).
    denominator_override: the whole batch's denominator, for exact gradient accumulation over
      micro-batches (verl's batch_num_tokens / global_batch_size); finite and >= 0.
    horizon: the constant divisor of seq-mean-token-sum-norm (verl's loss_scale_factor; T by
      default), finite and > 0.
    axis_name: shard_map axis; the denominator is then global.
    weights: optional [B] population shares of the rows (finite, >= 0): each row's terms are
      weighted by its share, in the numerator and the denominator (see the module docstring).

  Returns:
    Aggregate(value, numerator, denominator). An all-masked or empty batch (B or T = 0) gives
    value 0 and a zero gradient. The unweighted value divides by max(denominator, 1) (a count);
    the weighted one by the denominator itself when it is > 0 (a total weight may be below 1),
    and is 0 when it is 0.

  Raises:
    ValueError: for a concrete horizon that is not finite and > 0, or a concrete denominator
      that is not finite and >= 0 (traced values are not checked).
  """
  check_mode(mode)
  _checks.check_same_shape(("loss_mat", "response_mask"), (loss_mat, response_mask), rank=2)
  if horizon is not None:
    _checks.check_positive("horizon", horizon)
  if denominator_override is not None:
    _checks.check_nonnegative("denominator", denominator_override)
  mask = _checks.as_mask("response_mask", response_mask)
  loss_mat = _checks.upcast(jnp.asarray(loss_mat))
  if weights is not None:
    weights = _checks.check_weights(weights, mask.shape[0]).astype(loss_mat.dtype)
    weights = jnp.where(weights > 0, weights, 0.0)  # under jit, a bad weight leaves its row out
  num = _sequence_terms(loss_mat, mask, mode, horizon, weights)
  if denominator_override is None:
    den = denominator(mask, mode, axis_name, weights=weights)
  else:
    den = jnp.asarray(denominator_override, loss_mat.dtype)
  den = den.astype(loss_mat.dtype)
  if weights is None or mode == "token-sum":
    return Aggregate(num / jnp.maximum(den, 1.0), num, den)
  return Aggregate(num / jnp.where(den > 0, den, 1.0), num, den)

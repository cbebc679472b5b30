"""Benchmark inputs: verl-shaped [batch, time] arrays with no token on a decision boundary.

Clip-Cov and KL-Cov make discrete decisions per token (is the PPO clip active, is c_i inside
the band (lb, ub), is c_i among the top K). Two correct float32 implementations may round a
quantity that sits within a few ulps of a threshold to opposite sides, and then their losses
differ by a whole token's term. That is not a disagreement about semantics, so the parity
inputs keep every valid token at least a small margin away from every threshold: offending tokens
are masked out (they become padding) and the statistics are recomputed, until none is left.

Everything here is NumPy: the same arrays feed covrl (JAX) and verl (PyTorch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class LossInputs(NamedTuple):
  """float32 [B, T] arrays in verl's argument order, and the float32 0/1 response mask."""

  old_log_prob: np.ndarray
  log_prob: np.ndarray
  advantages: np.ndarray
  response_mask: np.ndarray

  @property
  def num_tokens(self) -> int:
    return int(self.response_mask.sum())


def policy_inputs(batch: int, time: int, seed: int = 0, *, log_ratio_std: float = 0.15
                  ) -> LossInputs:
  """Random GRPO-like inputs: variable response lengths, one advantage per sequence.

  log pi ~ -Exponential(1) (most sampled tokens are likely ones), log pi_old = log pi + noise of
  standard deviation `log_ratio_std` (so a few tokens are clipped), advantages ~ N(0, 1) per
  sequence, responses of length uniform in [time / 4, time].
  """
  rng = np.random.default_rng(seed)
  lengths = rng.integers(max(1, time // 4), time + 1, size=batch)
  mask = np.arange(time)[None, :] < lengths[:, None]
  log_prob = -rng.exponential(1.0, (batch, time))
  old = log_prob + rng.normal(0.0, log_ratio_std, (batch, time))
  adv = np.repeat(rng.normal(0.0, 1.0, (batch, 1)), time, axis=1)
  f32 = lambda x: np.ascontiguousarray(x, np.float32)
  return LossInputs(f32(old), f32(log_prob), f32(adv), f32(mask))


def logits_inputs(batch: int, time: int, vocab: int, seed: int = 0) -> tuple[np.ndarray,
                                                                               np.ndarray]:
  """float32 [B, T, V] logits (scale 2, so policies are neither flat nor one-hot) and a mask."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(max(1, time // 4), time + 1, size=batch)
  mask = (np.arange(time)[None, :] < lengths[:, None]).astype(np.float32)
  logits = rng.standard_normal((batch, time, vocab), dtype=np.float32)
  logits *= np.float32(2.0)
  return logits, mask


def _groups(batch: int, micro_batch_size: int | None) -> list[slice]:
  size = batch if micro_batch_size is None else micro_batch_size
  return [slice(i, i + size) for i in range(0, batch, size)]


def _covariance(lp: np.ndarray, adv: np.ndarray, valid: np.ndarray) -> np.ndarray:
  n = valid.sum()
  mean_lp = (lp * valid).sum() / n
  mean_adv = (adv * valid).sum() / n
  return (lp - mean_lp) * (adv - mean_adv)


def boundary_tokens(
    x: LossInputs,
    *,
    micro_batch_size: int | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_c: float = 3.0,
    band: tuple[float, float] = (1.0, 5.0),
    top_ratios: Sequence[float] = (),
    margin: float = 1e-4,
) -> np.ndarray:
  """Valid tokens within `margin` (relative) of a threshold, computed in float64.

  Thresholds: the PPO ratio at 1 - clip_low, 1 + clip_high and the dual-clip c; c_i at the band
  edges; and, for each KL-Cov ratio, the K-th versus (K+1)-th largest c_i of each selection
  group (a small gap there is a near-tie, and the (K+1)-th token is flagged).
  """
  valid = x.response_mask > 0
  lp, old, adv = (np.asarray(a, np.float64) for a in (x.log_prob, x.old_log_prob, x.advantages))
  ratio = np.exp(lp - old)
  bad = np.zeros(valid.shape, bool)
  for edge in (1.0 - clip_low, 1.0 + clip_high, clip_c):
    bad |= np.abs(ratio - edge) < margin * edge
  for rows in _groups(valid.shape[0], micro_batch_size):
    v = valid[rows]
    if not v.any():
      continue
    cov = _covariance(lp[rows], adv[rows], v)
    group_bad = np.zeros(v.shape, bool)
    for edge in band:
      group_bad |= np.abs(cov - edge) < margin * max(1.0, abs(edge))
    flat_cov = np.where(v, cov, -np.inf).ravel()
    order = np.argsort(-flat_cov, kind="stable")
    for r in top_ratios:
      k = max(int(r * int(v.sum())), 1)
      if k < int(v.sum()):
        a, b = flat_cov[order[k - 1]], flat_cov[order[k]]
        if a - b < margin * max(1.0, abs(a)):
          group_bad.ravel()[order[k]] = True
    bad[rows] |= group_bad
  return bad & valid


def without_boundary_tokens(x: LossInputs, max_rounds: int = 50, **kwargs) -> LossInputs:
  """Mask out boundary tokens (see `boundary_tokens`) until none is left.

  Raises:
    RuntimeError: if masking does not settle within `max_rounds` rounds.
  """
  for _ in range(max_rounds):
    bad = boundary_tokens(x, **kwargs)
    if not bad.any():
      return x
    x = x._replace(response_mask=np.where(bad, 0.0, x.response_mask).astype(np.float32))
  raise RuntimeError("could not clear the decision boundaries of the benchmark inputs.")

"""Parity: covrl's verl-compatible mode gives verl's loss and gradient on the same inputs.

Run before any timing (a fast wrong loss is worth nothing); `check` raises `ParityError` on the
first disagreement beyond float32 round-off.

Cases, each on boundary-free inputs (`benchmarks.inputs`):
  * one micro-batch (the whole batch; verl's local selection is then global), every loss, every
    verl loss_agg_mode for the policy losses;
  * several micro-batches: verl called per micro-batch with global_batch_info carrying the whole
    batch's token and sequence counts, gradients accumulated, against covrl's
    selection="local", micro_batch_size=... on the whole batch in one call;
  * a control that must fail: covrl's global selection against verl's per-micro-batch one
    (they select different tokens), so the check is known to be able to fail;
  * exactly at the bounds (`bound_cases`): ratios exactly 1 - eps, 1 + eps and the dual-clip c
    (float32 inputs whose exp is the bound in both frameworks), log-ratios exactly +-20, for
    PPO, Clip-Cov and KL-Cov: loss, every gradient entry to 8 ulps of itself (torch.clamp's
    derivative 1 at a bound, which covrl's clamp follows) and verl's ppo_kl metric.

Settings: Clip-Cov with clip_cov_ratio = 1 (every candidate is detached, so verl's random
permutation does not matter); KL-Cov with kl_cov_ratio = 2e-3 and verl's ppo_kl_coef 0.1; inputs
with |log ratio| well below 20 (covrl clamps the log-ratio at +-20 in every loss, verl only in
the vanilla loss) and without near-ties in the KL-Cov ranking (torch.topk's tie order is
unspecified).

Tolerances (float32 round-off, eps = 2^-23):
  loss      |covrl - verl| <= 1e-5 * S, S the same aggregate (loss_agg_mode) of an upper bound
            on |token loss| (|A| max(r, 1 + eps_high) + beta |log r|; coef log V for the bonus):
            two float32 sums of 10^4..10^5 terms in different orders differ by about this;
  gradient  max |covrl - verl| <= 32 eps max |verl| (every gradient entry is a few float32
            operations on one token, plus the shared 1/denominator or the token entropy).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import contestants as C
from benchmarks import inputs as I

EPS32 = float(np.finfo(np.float32).eps)
LOSS_RTOL = 1e-5
GRAD_ULPS = 32


class ParityError(AssertionError):
  """covrl and verl disagree beyond float32 round-off."""


@dataclasses.dataclass(frozen=True)
class Case:
  loss: str
  micro_batch_size: int | None
  loss_agg_mode: str
  covrl_loss: float
  verl_loss: float
  loss_error: float
  loss_tolerance: float
  grad_error: float
  grad_tolerance: float
  grad_max: float
  tokens: int
  touched: int  # tokens clipped (PPO), detached (Clip-Cov), penalised (KL-Cov); -1: n/a
  expect_equal: bool = True

  @property
  def ok(self) -> bool:
    close = self.loss_error <= self.loss_tolerance and self.grad_error <= self.grad_tolerance
    return close == self.expect_equal

  def describe(self) -> str:
    what = "match" if self.expect_equal else "must differ (control)"
    return (f"{self.loss} mbs={self.micro_batch_size} {self.loss_agg_mode} [{what}]: "
            f"loss {self.covrl_loss:.8g} vs {self.verl_loss:.8g} (|d|={self.loss_error:.2e}, "
            f"tol {self.loss_tolerance:.2e}); grad max|d|={self.grad_error:.2e} "
            f"(tol {self.grad_tolerance:.2e}); {self.tokens} tokens, {self.touched} acted on")


def _aggregate_np(x: np.ndarray, mask: np.ndarray, mode: str) -> float:
  """verl's loss_agg_mode applied to a [B, T] array in float64 (for tolerance scales)."""
  x, mask = np.asarray(x, np.float64), np.asarray(mask, np.float64)
  seq_sum, seq_len = (x * mask).sum(-1), mask.sum(-1)
  num_seq = max(float((seq_len > 0).sum()), 1.0)
  if mode == "token-mean":
    return float(seq_sum.sum() / max(mask.sum(), 1.0))
  if mode == "token-sum":
    return float(seq_sum.sum())
  if mode == "seq-mean-token-sum":
    return float(seq_sum.sum() / num_seq)
  if mode == "seq-mean-token-mean":
    return float((seq_sum / np.maximum(seq_len, 1.0)).sum() / num_seq)
  if mode == "seq-mean-token-sum-norm":
    return float(seq_sum.sum() / num_seq / x.shape[-1])
  raise ValueError(mode)


def _loss_scale(name: str, s: C.Settings, data: Any) -> float:
  """The loss_agg_mode aggregate of an upper bound on |token loss| (see the module docstring)."""
  if name == "entropy":
    logits, mask = data
    bound = np.full(mask.shape, s.entropy_coef * float(np.log(logits.shape[-1])))
    return _aggregate_np(bound, mask, s.loss_agg_mode)
  old, lp, adv, mask = (np.asarray(a, np.float64) for a in data)
  log_r = lp - old
  bound = np.abs(adv) * np.maximum(np.exp(log_r), 1.0 + s.clip_ratio)
  if name == "kl_cov":
    bound = bound + s.kl_coef * np.abs(log_r)
  return _aggregate_np(bound, mask, s.loss_agg_mode)


def _touched(name: str, grad: np.ndarray, data: Any, s: C.Settings) -> int:
  """Tokens a method acted on, read off verl's gradient (token-mean only, else -1).

  PPO and Clip-Cov: tokens with zero gradient (clipped, or clipped plus detached); KL-Cov:
  tokens whose gradient is not the plain -A r / N (the penalised ones).
  """
  if name == "entropy" or s.loss_agg_mode != "token-mean":
    return -1
  old, lp, adv, mask = data
  valid = mask > 0
  if name == "kl_cov":  # penalised tokens: gradient differs from the plain -A r / N
    n = mask.sum()
    plain = -adv * np.exp(lp.astype(np.float64) - old) / n
    return int((valid & ~np.isclose(grad, plain, rtol=1e-4, atol=0)).sum())
  return int((valid & (grad == 0)).sum())


def run_case(name: str, s: C.Settings, data: Any, *, micro_batch_size: int | None,
             covrl_kwargs: dict | None = None, expect_equal: bool = True,
             covrl_settings: C.Settings | None = None) -> Case:
  """covrl and verl on the same data; the comparison (no exception).

  `covrl_settings` (default: `s`) lets a test give covrl other hyperparameters than verl.
  """
  covrl_s = s if covrl_settings is None else covrl_settings
  covrl_loss, covrl_grad = C.covrl_call(name, covrl_s, data, **(covrl_kwargs or {}))()
  verl_loss, verl_grad = C.verl_call(name, s, data, micro_batch_size=micro_batch_size)()
  cg, vg = np.asarray(covrl_grad, np.float64), C.as_numpy(verl_grad).astype(np.float64)
  cl, vl = float(covrl_loss), float(verl_loss)
  grad_max = float(np.abs(vg).max())
  mask = data[-1]
  return Case(
      loss=name, micro_batch_size=micro_batch_size, loss_agg_mode=s.loss_agg_mode,
      covrl_loss=cl, verl_loss=vl, loss_error=abs(cl - vl),
      loss_tolerance=LOSS_RTOL * _loss_scale(name, s, data),
      grad_error=float(np.abs(cg - vg).max()), grad_tolerance=GRAD_ULPS * EPS32 * grad_max,
      grad_max=grad_max, tokens=int(mask.sum()),
      touched=_touched(name, C.as_numpy(verl_grad), data, s), expect_equal=expect_equal,
  )


def cases(batch: int = 32, time: int = 512, *, micro_batches: int = 4, vocab: int = 512,
          seed: int = 0, agg_mode_losses: tuple[str, ...] = C.POLICY_LOSSES) -> list[Case]:
  """Every parity case at one size (see the module docstring).

  `agg_mode_losses`: the policy losses checked in every loss_agg_mode (the others in
  token-mean only).
  """
  base = C.Settings(clip_cov_ratio=1.0, kl_cov_ratio=2e-3)
  out = []
  mbs = batch // micro_batches
  for micro in (None, mbs):
    x = I.without_boundary_tokens(
        I.policy_inputs(batch, time, seed), micro_batch_size=micro, top_ratios=(base.kl_cov_ratio,))
    data = C.policy_data(x)
    for mode in C.LOSS_AGG_MODES if micro is None else ("token-mean",):
      s = dataclasses.replace(base, loss_agg_mode=mode)
      for name in C.POLICY_LOSSES if mode == "token-mean" else agg_mode_losses:
        kwargs = {} if name == "ppo" else {"selection": "local", "micro_batch_size": micro}
        out.append(run_case(name, s, data, micro_batch_size=micro, covrl_kwargs=kwargs))
    if micro is not None:  # control: global selection is not verl's per-micro-batch one
      for name in ("clip_cov", "kl_cov"):
        out.append(run_case(name, base, data, micro_batch_size=micro,
                            covrl_kwargs={"selection": "global"}, expect_equal=False))
  logits, mask = I.logits_inputs(max(1, batch // 4), time // 4, vocab, seed)
  for micro in (None, max(1, batch // 4 // micro_batches)):
    out.append(run_case("entropy", base, (logits, mask), micro_batch_size=micro))
  return out


def check(**kwargs) -> list[Case]:
  """Run every case and the bound cases; raise ParityError listing the failures, else return
  the cases."""
  results = cases(**kwargs)
  bad = [c.describe() for c in results if not c.ok]
  bad += [f"at the bounds, {what}: |d|={err:.2e} > {tol:.2e}" for what, err, tol in bound_cases()
          if not err <= tol]
  if bad:
    raise ParityError("covrl and verl disagree:\n  " + "\n  ".join(bad))
  return results


# ----------------------------------------------------------------------------------------------
# Exactly at the bounds: the clip edges, the dual-clip constant and the log-ratio clamp.


def exact_log(target: float) -> np.float32:
  """A float32 x with exp(x) == float32(target) exactly in both PyTorch and XLA.

  The float32 neighbours of log(target) are tried in order of distance; the inputs built from
  them put a ratio exactly on a bound in both frameworks, so the comparison tests the
  derivative convention there, not exp's last bit.
  """
  import torch

  t = np.float32(target)
  x0 = np.array([np.log(np.float64(t))], np.float32)
  steps = np.array(sorted(range(-64, 65), key=abs), np.int32)
  cands = (x0.view(np.int32) + steps).view(np.float32)
  ok = (torch.exp(torch.from_numpy(cands)).numpy() == t) & (np.asarray(jnp.exp(cands)) == t)
  if not ok.any():
    raise RuntimeError(f"no float32 x near log({target}) with exp(x) == {t} in both frameworks.")
  return cands[np.argmax(ok)]


def bound_inputs(s: C.Settings) -> tuple[np.ndarray, ...]:
  """One row of tokens, each exactly on a bound: r = 1 - eps, 1 + eps and c with both signs of
  A, log r = +-20 exactly, and two ordinary tokens (verl's argument order, float32)."""
  lo, hi, c = (exact_log(v) for v in (1.0 - s.clip_ratio, 1.0 + s.clip_ratio, s.clip_ratio_c))
  rows = [  # (old_log_prob, log_prob, advantage)
      (0.0, lo, -1.0), (0.0, lo, 1.0), (0.0, hi, 1.0), (0.0, hi, -1.0), (0.0, c, -1.0),
      (0.0, c, 1.0), (-20.0, 0.0, 1.0), (-20.0, 0.0, -1.0), (20.0, 0.0, 1.0), (20.0, 0.0, -1.0),
      (-0.5, -0.4, 0.7), (-1.0, -1.3, -0.4)]
  old, lp, adv = (np.array([[r[i] for r in rows]], np.float32) for i in range(3))
  return old, lp, adv, np.ones_like(old)


def bound_cases() -> list[tuple[str, float, float]]:
  """(what, error, tolerance) for each loss on `bound_inputs`: the loss, each gradient entry
  (relative to its own size, 8 ulps) and verl's ppo_kl metric. Clip-Cov's band is put where no
  token lies, so only its PPO part and its unclamped log-ratio are exercised."""
  import torch
  from verl.trainer.ppo import core_algos

  out = []
  for name, s in (("ppo", C.Settings()),
                  ("clip_cov", C.Settings(clip_cov_ratio=1.0, clip_cov_lb=1e6, clip_cov_ub=2e6)),
                  ("kl_cov", C.Settings(kl_cov_ratio=0.5))):
    data = bound_inputs(s)
    fn = C.covrl_value_and_grad(name, s)
    cl, cg, cm = fn(jax.random.key(0), *data)
    vl, vg = C.verl_call(name, s, data)()
    config = C.verl_config(name, s, {"dp_size": 1, "batch_num_tokens": int(data[-1].sum()),
                                     "global_batch_size": 1}, 1)
    _, vm = getattr(core_algos, C.VERL_NAMES[name])(
        *(torch.from_numpy(a) for a in data), loss_agg_mode=s.loss_agg_mode, config=config)
    cg, vg = np.asarray(cg, np.float64), C.as_numpy(vg).astype(np.float64)
    rel = np.abs(cg - vg) / np.maximum(np.abs(vg), np.finfo(np.float32).tiny)
    out += [(f"{name} loss", abs(float(cl) - float(vl)), LOSS_RTOL * _loss_scale(name, s, data)),
            (f"{name} gradient (relative, worst entry)", float(rel.max()), 8 * EPS32),
            (f"{name} ppo_kl", abs(float(cm["ppo_kl"]) - vm["actor/ppo_kl"]),
             8 * EPS32 * max(abs(vm["actor/ppo_kl"]), 1.0))]
  return out

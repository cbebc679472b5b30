"""covrl's verl-compatible losses against verl's own PyTorch functions, on the same inputs.

The benchmark's parity part (benchmarks/parity.py) at a small size: loss and gradient of PPO,
Clip-Cov, KL-Cov and the entropy bonus match verl 0.9's to float32 round-off, in one batch and
micro-batch by micro-batch, and a control case (covrl's global selection against verl's
per-micro-batch one) is detected as different. Needs the benchmark extras (torch, verl):
`bash benchmarks/install.sh .venv`; skipped when they are not importable.
"""

import dataclasses

import numpy as np
import pytest

from benchmarks import contestants, inputs, parity

_OK, _WHY = contestants.verl_available()
pytestmark = pytest.mark.skipif(
    not _OK, reason=f"torch/verl not importable ({_WHY}); install: bash benchmarks/install.sh")


@pytest.fixture(scope="module")
def cases():
  # Every loss_agg_mode on PPO only (the others in token-mean): keeps the test under ~20 s.
  return parity.cases(batch=16, time=256, micro_batches=4, vocab=256, seed=1,
                      agg_mode_losses=("ppo",))


def test_every_case_matches_verl(cases):
  bad = [c.describe() for c in cases if not c.ok]
  assert not bad, "\n".join(bad)


def test_cases_cover_every_loss_and_mode(cases):
  matched = {(c.loss, c.loss_agg_mode, c.micro_batch_size is None) for c in cases if c.expect_equal}
  for mode in contestants.LOSS_AGG_MODES:
    assert ("ppo", mode, True) in matched
  for loss in contestants.POLICY_LOSSES:
    assert (loss, "token-mean", True) in matched and (loss, "token-mean", False) in matched
  assert ("entropy", "token-mean", True) in matched and ("entropy", "token-mean", False) in matched


def test_methods_act_on_tokens(cases):
  # The comparison is only informative if clipping, detaching and penalising happen.
  acted = {c.loss: c.touched for c in cases
           if c.expect_equal and c.loss_agg_mode == "token-mean" and c.micro_batch_size is None}
  assert acted["ppo"] > 0
  assert acted["clip_cov"] > acted["ppo"]  # clipped plus detached tokens have zero gradient
  assert acted["kl_cov"] > 0


def test_control_cases_differ(cases):
  controls = [c for c in cases if not c.expect_equal]
  assert {c.loss for c in controls} == {"clip_cov", "kl_cov"}
  assert all(c.ok for c in controls), "\n".join(c.describe() for c in controls)


def test_parity_exactly_at_the_clip_bounds_and_the_clamp():
  # Ratios exactly at 1 - eps, 1 + eps and c, log-ratios exactly +-20: the gradient entries
  # match verl's to 8 ulps of each entry (jnp.clip's derivative 1/2 at a bound gave 3/4 and
  # 1/2 of verl's), and so do the loss and verl's ppo_kl for each loss (mean |log r| for KL-Cov).
  results = parity.bound_cases()
  assert len(results) == 9
  bad = [f"{what}: {err:.3g} > {tol:.3g}" for what, err, tol in results if not err <= tol]
  assert not bad, "\n".join(bad)


def test_bound_inputs_sit_exactly_on_the_bounds():
  import torch

  s = contestants.Settings()
  old, lp, _, _ = parity.bound_inputs(s)
  r_torch = torch.exp(torch.from_numpy(lp - old)).numpy()[0]
  for v in (np.float32(1 - s.clip_ratio), np.float32(1 + s.clip_ratio), np.float32(3.0)):
    assert (r_torch == v).sum() == 2
  assert ((lp - old)[0] == 20.0).sum() == 2 and ((lp - old)[0] == -20.0).sum() == 2


def test_check_raises_on_disagreement(monkeypatch):
  # covrl given another KL coefficient than verl: the comparison must catch it, and check()
  # must raise with the case in its message.
  x = inputs.without_boundary_tokens(inputs.policy_inputs(8, 64, 2), top_ratios=(2e-3,))
  s = contestants.Settings(kl_cov_ratio=2e-3)
  case = parity.run_case("kl_cov", s, contestants.policy_data(x), micro_batch_size=None,
                         covrl_settings=dataclasses.replace(s, kl_coef=2 * s.kl_coef))
  assert not case.ok
  monkeypatch.setattr(parity, "cases", lambda **kw: [case])
  monkeypatch.setattr(parity, "bound_cases", lambda: [])
  with pytest.raises(parity.ParityError, match="kl_cov"):
    parity.check()

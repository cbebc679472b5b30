"""The transformer claims pass at size "test" (the lab's T4 runs are shared between them)."""

import math

import pytest

from covrl.claims import registry

IDS = ["T1.7", "T1.8.tf", "T3.6.tf", "T4.1", "T4.2", "T4.3"]


def test_transformer_claims_are_registered():
  got = {c.claim_id for c in registry.claims(groups=["transformer"])}
  assert got == set(IDS)


@pytest.mark.parametrize("claim_id", IDS)
def test_claim_passes_at_test_size(claim_id):
  result = registry.run(claim_id, "test")
  m = result.measurement
  assert m.summary and isinstance(m.measured, dict) and m.predicted
  assert result.passed, f"{claim_id}: {m.summary}\n{m.notes}"
  for name, value in m.measured.items():
    if isinstance(value, float):
      assert math.isfinite(value) or name == "within_share", (claim_id, name, value)

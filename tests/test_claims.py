"""Every registered theorem, at the "test" size, must be confirmed by its check; the empirical
findings of THEORY.md T4 must be measured and reported (reproduced or not)."""

import pathlib
import re

import numpy as np
import pytest

from covrl.experiments.claims import registry

# Checks that take more than about 5 s at the test size on 2 CPU cores (compilation dominates).
SLOW = {"T1.6", "T1.7", "T1.8", "T1.8.tf", "T3.1", "T3.2", "T3.3", "T3.4", "T3.5", "T3.6",
        "T3.6.tf", "T3.7", "T4.1", "T4.2", "T5.4", "C1", "C2", "T2.tf", "T3.3.tf", "T3.4.tf",
        "T3.5.tf"}
TABULAR = {*(f"T1.{i}" for i in (1, 2, 3, 4, 5, 6, 8)), *(f"T2.{i}" for i in range(1, 8)),
           *(f"T3.{i}" for i in range(1, 7)), "T5.4"}
# The empirical findings of THEORY.md T4 (Cui et al.): measured and reported either way.
T4_FINDINGS = {"T4.1", "T4.2", "T4.3"}
# Closed-loop control (issue 6): measured comparisons against the targets (half the
# reactive rule's tracking error in the transformer lab, 1.2x the cost of a step), reported
# either way; their measurement and criterion are tested in tests/test_control_transformer.py.
CONTROL_TARGETS = {"C3", "C1.tf", "C3.tf"}
# Sampled measurements in the covariance regime (issue 11): measured over few seeds of a small
# network, reported either way; tested in tests/test_regime.py. (The theorems in a network are
# checked exactly: T2.tf, T3.3.tf-T3.5.tf, asserted like every theorem.)
REGIME_FINDINGS = {"T4.4.fork", "T4.5.fork", "T4.6.fork", "T4.3.fork"}
REPORTED = T4_FINDINGS | CONTROL_TARGETS | REGIME_FINDINGS


def _params():
  for claim in registry.claims():
    marks = [pytest.mark.slow] if claim.claim_id in SLOW else []
    yield pytest.param(claim.claim_id, id=claim.claim_id, marks=marks)


@pytest.mark.parametrize("claim_id", [p for p in _params() if p.id not in REPORTED])
def test_claim_passes(claim_id):
  result = registry.run(claim_id, size="test")
  m = result.measurement
  assert result.kind == "theorem"
  assert m.passed, f"{claim_id}: {m.summary}\nmeasured: {m.measured}\nnotes: {m.notes}"
  assert m.measured and m.predicted and m.summary


@pytest.mark.slow
# T4.3: tests/test_transformer_claims.py; the control claims: tests/test_control_transformer.py.
@pytest.mark.parametrize("claim_id", sorted(T4_FINDINGS - {"T4.3"}))
def test_empirical_claims_measure_and_report(claim_id):
  result = registry.run(claim_id, size="test")
  m = result.measurement
  assert result.kind == "empirical" and isinstance(m.passed, bool | np.bool_)
  assert m.measured and m.predicted and m.summary
  assert result.status in ("reproduced", "not reproduced")


def test_only_the_t4_findings_and_the_control_targets_are_reported_either_way():
  """Only Cui et al.'s empirical findings ("not reproduced") and the control targets ("not
  met") may come out negative without failing `covrl reproduce`."""
  kinds = {c.claim_id: c.kind for c in registry.claims()}
  assert {k for k, v in kinds.items() if v == "empirical"} == T4_FINDINGS | REGIME_FINDINGS
  assert {k for k, v in kinds.items() if v == "target"} == CONTROL_TARGETS


def test_status_and_exit_rule():
  m = registry.Measurement(False, {"x": 1}, {"x": 0}, "x")
  theorem = registry.ClaimResult("T0.1", "t", "test", 0.0, m, "theorem")
  empirical = registry.ClaimResult("T4.9", "t", "test", 0.0, m, "empirical")
  target = registry.ClaimResult("C9", "t", "test", 0.0, m, "target")
  crashed = registry.ClaimResult("T4.9", "t", "test", 0.0, m, "empirical", error="boom")
  assert (theorem.status, theorem.failed) == ("NOT CONFIRMED", True)
  assert (empirical.status, empirical.failed) == ("not reproduced", False)
  assert (target.status, target.failed) == ("not met", False)
  assert (crashed.status, crashed.failed) == ("ERROR", True)


def test_tabular_claims_are_all_registered_with_proof_links():
  found = {c.claim_id: c for c in registry.claims(["tabular"])}
  assert set(found) == TABULAR
  for claim_id, claim in found.items():
    theorem = claim_id.split(".")[0]
    assert re.fullmatch(rf"proofs/{theorem}_[a-z_]+\.md#{re.escape(claim_id)}", claim.proof)
    assert claim.title


def test_control_claims_are_registered_with_proof_links():
  found = {c.claim_id: c for c in registry.claims(["control"])}
  assert {"C1", "C2", "C3", "C1.tf", "C3.tf"} <= set(found)
  text = (pathlib.Path(__file__).resolve().parents[1] / "proofs/C_entropy_control.md").read_text()
  for claim_id, claim in found.items():
    # A lab variant (C3.tf) may link its base claim's section.
    anchors = {claim_id, claim_id.split(".")[0]}
    assert claim.proof in {f"proofs/C_entropy_control.md#{a}" for a in anchors}
    assert f'<a id="{claim.proof.split("#")[1]}"></a>' in text
  ids = [c.claim_id for c in registry.claims()]
  assert ids.index("T3.6") < ids.index("C1") < ids.index("C2") < ids.index("C3")


def test_registry_rejects_unknown_claims_and_sizes():
  with pytest.raises(KeyError):
    registry.get("T9.9")
  with pytest.raises(ValueError, match="size"):
    registry.get("T2.4").run("huge")


def test_same_seed_same_measurement():
  a = registry.run("T2.4", size="test", seed=3).measurement.measured
  b = registry.run("T2.4", size="test", seed=3).measurement.measured
  assert a == b
  assert np.isfinite(a["max_relative_error"])


def test_the_t3_3_figure_draws_at_the_test_size_too():
  """At "test" T3.3 runs only its exact check at the optimum (no runs, so no gap curves): its
  figure says so instead of failing (notebook 03 draws it at that size in CI)."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib.figure import Figure

  claim = registry.get("T3.3")
  fig = Figure()
  claim.plot(registry.Measurement(True, {"x": 1}, {"x": 1}, "", series={}), fig)
  assert "from the size 'fast' on" in fig.axes[0].texts[0].get_text()

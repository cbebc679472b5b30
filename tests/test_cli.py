"""`covrl reproduce` and `covrl list`: the report folder, its fields, and the exit status."""

import json
import os

import pytest

from covrl.experiments import cli
from covrl.experiments.claims import registry


def test_reproduce_writes_report_and_results(tmp_path, capsys):
  out = tmp_path / "report"
  status = cli.main(["reproduce", "--size", "test", "--only", "T2.4,T1.5", "--out", str(out)])
  assert status == 0
  printed = capsys.readouterr().out
  assert "T2.4" in printed and "confirmed" in printed and "2/2 theorems confirmed" in printed
  doc = json.loads((out / "results.json").read_text())
  for field in ("covrl_version", "jax_version", "python_version", "platform", "device_count",
                "size", "seed", "passed", "claims"):
    assert field in doc, field
  assert doc["size"] == "test" and doc["passed"] is True
  ids = [c["id"] for c in doc["claims"]]
  assert ids == ["T1.5", "T2.4"]
  for claim in doc["claims"]:
    assert claim["passed"] is True
    assert claim["measured"] and claim["predicted"]
    assert claim["proof"].startswith("proofs/T")
  report = (out / "report.md").read_text()
  assert "### T2.4" in report and "### T1.5" in report


def test_reproduce_draws_figures(tmp_path):
  out = tmp_path / "r"
  assert cli.main(["reproduce", "--size", "test", "--only", "T1.2", "--out", str(out)]) == 0
  doc = json.loads((out / "results.json").read_text())
  figure = doc["claims"][0]["figure"]
  assert os.path.getsize(out / figure) > 1000
  assert f"]({figure})" in (out / "report.md").read_text()


def test_a_failing_claim_makes_the_exit_status_nonzero(tmp_path, monkeypatch, capsys):
  def failing(size, key):
    return registry.Measurement(False, {"x": 1.0}, {"x": 0.0}, "x is 1, not 0")

  def crashing(size, key):
    raise RuntimeError("boom")

  fake = [registry.Claim("T0.1", "fails", "fake", failing),
          registry.Claim("T0.2", "crashes", "fake", crashing)]
  monkeypatch.setattr(registry, "claims", lambda groups=None: fake)
  status = cli.main(["reproduce", "--size", "test", "--out", str(tmp_path)])
  assert status == 1
  assert "Exit 1: a theorem was not confirmed" in capsys.readouterr().out
  doc = json.loads((tmp_path / "results.json").read_text())
  assert [c["passed"] for c in doc["claims"]] == [False, False]
  assert "boom" in doc["claims"][1]["measured"]["error"]


def test_unknown_claim_is_an_error(tmp_path):
  with pytest.raises(SystemExit):
    cli.main(["reproduce", "--only", "T9.9", "--out", str(tmp_path)])


def test_list(capsys):
  assert cli.main(["list"]) == 0
  out = capsys.readouterr().out
  assert "T1.1" in out and "T3.6" in out and "[tabular]" in out


def test_an_empirical_finding_not_reproduced_is_reported_not_failed(tmp_path, monkeypatch,
                                                                    capsys):
  def differs(size, key):
    return registry.Measurement(False, {"x": 1.0}, {"x": ">= 2"}, "x is 1, the paper saw 2")

  fake = [registry.Claim("T4.9", "a finding", "fake", differs, kind="empirical")]
  monkeypatch.setattr(registry, "claims", lambda groups=None: fake)
  assert cli.main(["reproduce", "--size", "test", "--out", str(tmp_path)]) == 0
  # The closing lines say why "0/1 empirical findings reproduced" still exits 0.
  assert "Exit 0: every theorem confirmed" in capsys.readouterr().out
  doc = json.loads((tmp_path / "results.json").read_text())
  assert doc["claims"][0]["status"] == "not reproduced" and doc["passed"] is True
  assert doc["num_empirical_reproduced"] == 0
  assert "not reproduced" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("command", [["list"], ["reproduce", "--size", "test"]])
def test_without_the_experiments_extra_the_command_says_what_to_install(command, monkeypatch,
                                                                        capsys):
  """On a core-only install (flax, orbax or matplotlib missing) `covrl` names the extra and
  exits 2, without a traceback (a missing module is simulated by a name that does not exist)."""
  monkeypatch.setattr(cli, "EXTRA_MODULES", {**cli.EXTRA_MODULES, "covrl_no_such_module": "x"})
  assert cli.main(command) == 2
  err = capsys.readouterr().err
  assert "needs the experiments extra" in err and "covrl_no_such_module" in err
  assert "Traceback" not in err

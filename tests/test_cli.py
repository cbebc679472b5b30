"""`covrl reproduce` and `covrl list`: the report folder, its fields, and the exit status."""

import json
import os

import pytest

from covrl.experiments import cli
from covrl.experiments.claims import registry


def test_reproduce_writes_report_and_results(tmp_path, capsys):
  out = tmp_path / "report"
  status = cli.main(["reproduce", "--size", "test", "--only", "T2.4,T1.5", "--out", str(out),
                     "--jobs", "1"])
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


def test_a_claim_not_run_at_fast_and_full_runs_its_full_check_at_long(
    tmp_path, monkeypatch, capsys):
  """A claim registered not_at=("fast", "full") measures at --size long (its check receives
  "full") and at "test"; at "fast" and "full" it is listed as not run, neither passing nor
  failing the job, and the headline counts it apart."""
  seen = []

  def check(size, key):
    seen.append(size)
    return registry.Measurement(True, {"x": 1.0}, {"x": ">= 1"}, "x is 1")

  registry.register("T4.99", "long", group="fake", kind="empirical",
                    not_at=("fast", "full"))(check)
  long_claim = registry._REGISTRY.pop("T4.99")
  usual = registry.Claim("T0.1", "usual", "fake", check)
  monkeypatch.setattr(registry, "claims", lambda groups=None: [usual, long_claim])
  for size in ("fast", "full"):
    seen.clear()
    assert cli.main(["reproduce", "--size", size, "--out", str(tmp_path / size)]) == 0
    assert seen == [size]  # only the usual claim ran
    doc = json.loads((tmp_path / size / "results.json").read_text())
    entry = doc["claims"][1]
    assert entry["status"] == "not run at this size" and entry["not_run"] is True
    assert entry["passed"] is False and doc["passed"] is True
    assert doc["num_not_run"] == 1 and doc["num_empirical"] == 0
    assert "1 not run at this size (--size long)" in doc["headline"]
    assert "figure" not in entry
  seen.clear()
  assert cli.main(["reproduce", "--size", "long", "--out", str(tmp_path / "long")]) == 0
  assert seen == ["full", "full"]  # both run; each check receives "full"
  doc = json.loads((tmp_path / "long" / "results.json").read_text())
  assert [c["status"] for c in doc["claims"]] == ["confirmed", "reproduced"]
  assert doc["num_not_run"] == 0 and doc["size"] == "long"


def test_which_claims_are_not_run_at_the_default_sizes():
  """The regime sweep runs at test and long; the Sort lab's method comparison at test, fast and
  long; every other claim at every size. A size outside fast and full cannot be left out."""
  expect = {**{c: ("test", "long") for c in ("T4.3.fork", "T4.4.fork", "T4.5.fork",
                                            "T4.6.fork")}, "T4.3": ("test", "fast", "long")}
  for claim in registry.claims():
    want = expect.get(claim.claim_id, registry.SIZES)
    assert tuple(claim.sizes) == want, claim.claim_id
    assert all(claim.sizes[s] == ("full" if s == "long" else s) for s in claim.sizes)
  with pytest.raises(ValueError, match="not_at"):
    registry.register("T0.9", "x", group="fake", not_at=("test",))


def test_a_long_claim_prints_progress_with_its_expected_time_left(tmp_path, monkeypatch,
                                                                  capsys):
  """While a claim runs, a line every interval: the time spent and, from the recorded timings,
  the time left for it and for the job."""
  import time

  from covrl.experiments import eta

  def slow(size, key):
    time.sleep(0.35)
    return registry.Measurement(True, {"x": 1.0}, {"x": ">= 1"}, "x is 1")

  fake = [registry.Claim("T0.1", "slow", "fake", slow), registry.Claim("T0.2", "next", "fake",
                                                                      slow)]
  monkeypatch.setattr(registry, "claims", lambda groups=None: fake)
  monkeypatch.setattr(eta, "load", lambda path=None: {"test": {"T0.1": 100.0, "T0.2": 200.0}})
  real = eta.Heartbeat.__init__
  monkeypatch.setattr(eta.Heartbeat, "__init__",
                      lambda self, *a, **k: real(self, *a, **{**k, "interval": 0.1}))
  assert cli.main(["reproduce", "--size", "test", "--out", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  first = [line for line in out.splitlines() if line.startswith("    ... T0.1:")]
  assert first, out
  assert "left; the job about 5m" in first[0]  # 100 s + 200 s recorded, minus a second


def test_heartbeat_lines_and_the_recorded_timings(tmp_path):
  from covrl.experiments import eta

  beat = eta.Heartbeat("T4.1", 170.0, after=300.0, pace=2.0, quiet=True)
  assert beat.line(40.0) == "    ... T4.1: 40s, about 5m00s left; the job about 15m00s left"
  assert beat.line(400.0).endswith("longer than recorded; the job about 10m00s left")
  assert "no recorded time" in eta.Heartbeat("X", None, quiet=True).line(20.0)
  report = {"size": "full", "covrl_version": "0", "jax_version": "0", "backend": "cpu",
            "device_count": 1, "created": "now",
            "claims": [{"id": "T1.1", "seconds": 2.5},
                       {"id": "T4.3.fork", "seconds": 0.0, "not_run": True}]}
  path = tmp_path / "results.json"
  path.write_text(json.dumps(report))
  out = tmp_path / "timings.json"
  out.write_text(json.dumps({"seconds": {"full": {"T4.3.fork": 900.0, "T2.4": 1.0}},
                             "sources": {"full": "an older run"}}))
  eta.record([str(path)], out)
  timings = eta.load(out)
  # T1.1 recorded, T4.3.fork's old time removed (not run at this size), T2.4 kept.
  assert timings == {"full": {"T1.1": 2.5, "T2.4": 1.0}}
  # T2.4's time still comes from the older run, and the source says so.
  source = json.loads(out.read_text())["sources"]["full"]
  assert source.startswith("an older run; then 2 of the claims from covrl reproduce --size full")
  assert eta.expected("T1.1", "long", timings) == 2.5  # long runs it as at full
  assert eta.expected("T1.1", "fast", timings) is None


def test_recorded_timings_cover_every_claim_at_fast_and_full():
  """The ETA's record is complete for the sizes CI and users run by default (rerun
  `python -m covrl.experiments.eta` on fresh reports when claims are added)."""
  from covrl.experiments import eta

  timings = eta.load()
  for size in ("fast", "full"):
    missing = [c.claim_id for c in registry.claims()
               if size in c.sizes and eta.expected(c.claim_id, size, timings) is None]
    assert not missing, (size, missing)

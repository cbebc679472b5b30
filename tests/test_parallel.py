"""`covrl reproduce --jobs N`: claims in worker processes, one core each, with the results of one
process; claims that share a cache run in one worker."""

import ast
import json
import pathlib

import pytest

from covrl.experiments import cli, parallel
from covrl.experiments.claims import registry

CLAIMS = pathlib.Path(registry.__file__).parent


def _measured(path: pathlib.Path) -> dict:
  doc = json.loads(path.read_text())
  return {c["id"]: (c["status"], c["measured"], c["summary"]) for c in doc["claims"]}


def test_two_workers_give_the_results_of_one_process(tmp_path, capsys):
  """Same claims, same seed: every measured number and summary equal, digit for digit. T2.4
  and T2.5 share a unit (tabular_t2's cache), T1.5 runs in the other worker."""
  only = "T1.5,T2.4,T2.5"
  assert cli.main(["reproduce", "--size", "test", "--only", only, "--seed", "0", "--jobs", "2",
                   "--out", str(tmp_path / "two")]) == 0
  printed = capsys.readouterr().out
  assert "2 worker processes" in printed
  assert cli.main(["reproduce", "--size", "test", "--only", only, "--seed", "0", "--jobs", "1",
                   "--out", str(tmp_path / "one")]) == 0
  two, one = _measured(tmp_path / "two" / "results.json"), _measured(
      tmp_path / "one" / "results.json")
  assert list(two) == list(one) == ["T1.5", "T2.4", "T2.5"]  # id order, whatever ended first
  assert two == one


@pytest.mark.parametrize("jobs", ["0", "-1", "two"])
def test_jobs_must_be_auto_or_a_positive_int(jobs, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main(["reproduce", "--size", "test", "--only", "T1.5", "--jobs", jobs,
              "--out", str(tmp_path)])
  assert exit_.value.code == 2
  assert "--jobs must be 'auto' or an int >= 1" in capsys.readouterr().err


def _imports_and_caches() -> tuple[dict[str, set[str]], set[str]]:
  """Claim module -> the claim modules it imports from; the modules that hold a cache (an
  lru_cache or a module-level dict assigned empty)."""
  imports, caching = {}, set()
  for path in CLAIMS.glob("*.py"):
    name = f"covrl.experiments.claims.{path.stem}"
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
          "covrl.experiments.claims"):
        if node.module == "covrl.experiments.claims":
          found |= {f"{node.module}.{a.name}" for a in node.names}
        else:
          found.add(node.module)
      if isinstance(node, ast.Attribute) and node.attr == "lru_cache":
        caching.add(name)
      if (isinstance(node, ast.AnnAssign | ast.Assign) and isinstance(node.value, ast.Dict)
          and not node.value.keys and node in tree.body):
        caching.add(name)
    imports[name] = found
  return imports, caching


def test_claims_that_read_another_modules_cache_share_its_unit():
  """A claim module that imports from a claim module holding a cache runs in that module's
  unit (parallel.SHARED_CACHES), so the cached runs are computed once; the registry's own cache
  does not count."""
  imports, caching = _imports_and_caches()
  caching.discard("covrl.experiments.claims.registry")
  checks = {c.check.__module__ for c in registry.claims()}
  for module in checks:
    for source in imports[module] & caching:
      if source in checks and source != module:
        unit = parallel.SHARED_CACHES.get(module, module)
        assert unit == parallel.SHARED_CACHES.get(source, source), (module, source)
      elif source not in checks:  # a runs module that registers nothing: named as the unit
        assert parallel.SHARED_CACHES.get(module) == source, (module, source)
  # The mapping names real modules, and every claim's unit is one of them.
  for module, unit in parallel.SHARED_CACHES.items():
    assert module in imports and unit in imports, (module, unit)


def test_units_keep_a_cache_together_and_go_longest_first():
  claims = registry.claims()
  by_id = {c.claim_id: c for c in claims}
  recorded = {c.claim_id: 1.0 for c in claims}
  recorded["C1.tf"] = 1000.0
  plan = parallel.units(claims, recorded)
  assert "C1.tf" in [c.claim_id for c in plan[0]]
  where = {c.claim_id: i for i, unit in enumerate(plan) for c in unit}
  for a, b in [("T2.tf", "T3.4.tf"), ("T3.3.tf", "T3.5.tf"), ("T2.4", "T2.6"),
               ("T3.3", "T3.5"), ("C1.tf", "C3.tf"), ("T4.1", "T4.2")]:
    assert where[a] == where[b], (a, b)
  assert sorted(c.claim_id for u in plan for c in u) == sorted(by_id)


class _Worker:
  def __init__(self, pid, exitcode):
    self.pid, self.exitcode = pid, exitcode

  def is_alive(self):
    return self.exitcode is None


def test_a_dead_worker_fails_its_claims_and_the_others_go_on():
  make = lambda i: registry.Claim(i, i, "fake", lambda size, key: None)
  plan = [[make("T0.1"), make("T0.2")], [make("T0.3")]]
  results, running, started, done = {}, {"T0.1": (0.0, 11), "T0.3": (0.0, 12)}, {"T0.1",
                                                                                "T0.3"}, []
  workers = [_Worker(11, -9), _Worker(12, None)]
  parallel._fail_dead_workers(workers, running, plan, started, results, "test", done.append)
  assert sorted(results) == ["T0.1", "T0.2"] and list(running) == ["T0.3"]
  assert all("died (exit code -9)" in r.error and r.failed for r in results.values())
  # When no worker is left, whatever did not run fails too.
  workers[1] = _Worker(12, 0)
  parallel._fail_dead_workers(workers, running, plan, started, results, "test", done.append)
  assert sorted(results) == ["T0.1", "T0.2", "T0.3"] and not running
  assert "ended before running it" in results["T0.3"].error
  assert len(done) == 3

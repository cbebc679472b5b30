"""Notebook 05 (predictive entropy control) runs top to bottom, as in CI (nbclient)."""

import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Claims whose outcome is reported whichever way it falls (tests/test_claims.py::REPORTED): the
# notebook may print them as NOT CONFIRMED, which is then the honest outcome, not an error.
REPORTED = {"C3", "C1.tf", "C3.tf"}


@pytest.mark.slow
def test_notebook_05_runs(monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  path = ROOT / "notebooks" / "05_entropy_control_loop.ipynb"
  nb = nbformat.read(path, as_version=4)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT),
                                                                 os.environ.get("PYTHONPATH")])))
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("COVRL_SIZE", "test")  # the saved outputs are at "fast"; test the code
  monkeypatch.delenv("JAX_ENABLE_X64", raising=False)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute()
  errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors, errors
  text = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                 for o in cell.get("outputs", []) if o.get("output_type") == "stream")
  for claim_id in ("C1", "C2", "C3", "C1.tf", "C3.tf"):
    assert re.search(rf"^{claim_id}: (confirmed|NOT CONFIRMED)", text, re.M), claim_id
  missed = set(re.findall(r"^(C\d+(?:\.\w+)?): NOT CONFIRMED", text, re.M))
  assert missed <= REPORTED, missed

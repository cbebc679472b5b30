"""The tabular lab's notebooks run top to bottom (executed with nbclient, as in CI)."""

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ["01_covariance_identity", "02_entropy_bonus_bias", "03_annealed_covariance_control"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  path = ROOT / "notebooks" / f"{name}.ipynb"
  nb = nbformat.read(path, as_version=4)
  # The kernel imports this checkout's covrl, and runs like a user's: no test-only JAX flags.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT),
                                                                 os.environ.get("PYTHONPATH")])))
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv("JAX_ENABLE_X64", raising=False)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute()
  errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors, errors
  text = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                 for o in cell.get("outputs", []) if o.get("output_type") == "stream")
  assert "NOT CONFIRMED" not in text, text

"""The notebooks run top to bottom (executed with nbclient, as a user's kernel would run them).

Marked `notebook`: deselected by the default `pytest` run (the unit tests) and run by CI as a
step of its own (`pytest -m notebook`). Every notebook runs at the claims' "test" size here
(COVRL_NOTEBOOK_SIZE): this checks that each runs top to bottom and prints what it should; the
claims themselves are measured at their sizes by `covrl reproduce` (CI's main job), and the
notebooks' saved outputs are at their own default size.
"""

import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = {
    "01_covariance_identity": "test",
    "02_entropy_bonus_bias": "test",
    "03_annealed_covariance_control": "test",
    "04_transformer_entropy_control": "test",
    "05_entropy_control_loop": "test",
    "06_tunix_kl_cov": "test",
}
# Notebooks that need an optional extra (skipped without it; CI's tunix leg runs them).
NEEDS = {"06_tunix_kl_cov": "tunix"}
# Lines each notebook must print (beyond "no errors, no unconfirmed theorem").
EXPECTED = {
    "02_entropy_bonus_bias": [r"^T2\.tf: confirmed"],
    "03_annealed_covariance_control": [r"^T3\.3\.tf: confirmed", r"^T3\.4\.tf: confirmed",
                                       r"^T3\.5\.tf: confirmed"],
    "04_transformer_entropy_control": [r"^T1\.7: confirmed", r"^T3\.6\.tf: confirmed",
                                       r"resumed run identical: True",
                                       r"^T4\.3: (reproduced|not reproduced)",
                                       r"^T4\.4\.fork: (reproduced|not reproduced)",
                                       r"^T4\.3\.fork: (reproduced|not reproduced)"],
    "05_entropy_control_loop": [r"^C1: confirmed", r"^C2: confirmed", r"^C3: (met|not met)",
                                r"^C1\.tf: (met|not met)", r"^C3\.tf: (met|not met)"],
    "06_tunix_kl_cov": [r"^logged loss equals covrl's loss: True"],
}


def run_notebook(name: str, size: str, monkeypatch) -> str:
  """Execute a notebook; returns its printed output."""
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  path = ROOT / "notebooks" / f"{name}.ipynb"
  nb = nbformat.read(path, as_version=4)
  # This checkout's covrl, and no test-only JAX flags: the kernel runs like a user's.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT),
                                                                 os.environ.get("PYTHONPATH")])))
  monkeypatch.setenv("COVRL_NOTEBOOK_SIZE", size)
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv("JAX_ENABLE_X64", raising=False)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  errors = [o for o in outputs if o.get("output_type") == "error"]
  assert not errors, errors
  return "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")


@pytest.mark.notebook
@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_runs(name, monkeypatch):
  if name in NEEDS:
    pytest.importorskip(NEEDS[name], reason=f"needs the covrl[{NEEDS[name]}] extra")
  text = run_notebook(name, NOTEBOOKS[name], monkeypatch)
  assert "NOT CONFIRMED" not in text and "ERROR" not in text, text
  for pattern in EXPECTED.get(name, []):
    assert re.search(pattern, text, flags=re.M), (pattern, text[-3000:])


def test_every_notebook_is_tested_and_installs_covrl_when_missing():
  found = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
  assert found == sorted(NOTEBOOKS)
  for name in found:
    first_code = next(c for c in __import__("json").loads(
        (ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"] if c["cell_type"] == "code")
    assert "pip install" in "".join(first_code["source"]), name


def _notebooks():
  return [*sorted((ROOT / "notebooks").glob("*.ipynb")), ROOT / "docs" / "getting_started.ipynb"]


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.stem)
def test_every_notebook_has_a_colab_badge_and_installs_what_it_imports(path):
  """The first cell opens the notebook itself on Colab; the install cell uses a form that works
  (covrl is on no package index) and names the extras the notebook imports."""
  nbformat = pytest.importorskip("nbformat")
  from _docs import install_problems

  nbformat.validate(nbformat.read(path, as_version=4))
  cells = __import__("json").loads(path.read_text())["cells"]
  first = "".join(cells[0]["source"])
  target = path.relative_to(ROOT).as_posix()
  assert cells[0]["cell_type"] == "markdown"
  assert ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
          f"(https://colab.research.google.com/github/covrl/covrl/blob/main/{target})") in first
  install = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
  lines = [line for line in install.splitlines() if "pip install" in line]
  assert lines and install_problems(lines) == [], lines
  code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
  joined = " ".join(lines)
  named = {e for group in re.findall(r"covrl\[([\w,]+)\]", joined) for e in group.split(",")}
  needs = set()
  if re.search(r"covrl\.(experiments|transformer)|from covrl import transformer", code):
    needs.add("experiments")  # which includes the transformer extra
  if re.search(r"^\s*(import|from) tunix", code, flags=re.M):
    needs.add("tunix")
  assert needs <= named, (needs, named)
  if re.search(r"^\s*import matplotlib", code, flags=re.M):
    assert "experiments" in named or "matplotlib" in joined

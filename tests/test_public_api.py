"""The public surface: sorted, importable, with docstrings, and listed in the API reference
(docs/api/*.rst, built by Sphinx in CI with warnings as errors)."""

import pathlib
import re
import types

import pytest

import covrl
from covrl import controllers, tabular

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "api"


def documented_names() -> set[str]:
  """Names the reference documents: the autosummary lists of covrl's flat names (the check
  docs/_ext/api_coverage.py runs at build time), `:members:` lists and auto* directives."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("api_coverage",
                                                DOCS.parent / "_ext" / "api_coverage.py")
  coverage = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(coverage)
  names = {name.removeprefix("covrl.") for name in coverage.documented()
           if name.count(".") == 1 and name.startswith("covrl.")}
  for page in DOCS.glob("*.rst"):
    text = page.read_text()
    for line in re.findall(r":members:\s*(.+)", text):
      names.update(n.strip() for n in line.split(","))
    names.update(m.split(".")[-1] for m in re.findall(
        r"\.\. auto(?:class|function|data|module)::\s*([\w.]+)", text))
  return names


@pytest.mark.parametrize("module", [covrl, controllers, tabular], ids=lambda m: m.__name__)
def test_all_is_sorted_and_importable(module):
  assert list(module.__all__) == sorted(module.__all__)
  for name in module.__all__:
    assert hasattr(module, name), name


@pytest.mark.parametrize("module", [covrl, controllers, tabular], ids=lambda m: m.__name__)
def test_every_public_name_has_a_docstring_and_is_in_the_api_reference(module):
  names = [n for n in module.__all__ if not n.startswith("__")
           and not isinstance(getattr(module, n), types.ModuleType)]
  missing_doc = [n for n in names if not (getattr(getattr(module, n), "__doc__", None) or "")
                 .strip() and not isinstance(getattr(module, n), dict | tuple | str)]
  assert not missing_doc, missing_doc
  missing = sorted(set(names) - documented_names())
  assert not missing, f"not in docs/api/*.rst: {missing}"


def test_version_is_recorded():
  assert re.fullmatch(r"\d+\.\d+\.\d+", covrl.__version__)

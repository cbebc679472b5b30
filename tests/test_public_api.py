"""The public surface: sorted, importable, and documented in the README's API table."""

import pathlib
import re

import covrl

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def api_table_names():
  text = README.read_text()
  section = text.split("## Public API", 1)[1].split("\n## ", 1)[0]
  names = set()
  for line in section.splitlines():
    if line.startswith("| `"):
      first_cell = line.split("|")[1]
      names.update(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)", first_cell))
  return names


def test_all_is_sorted_and_importable():
  assert list(covrl.__all__) == sorted(covrl.__all__)
  for name in covrl.__all__:
    assert hasattr(covrl, name), name


def test_every_public_name_is_in_the_readme_api_table():
  missing = set(covrl.__all__) - api_table_names()
  assert not missing, f"not in README's API table: {sorted(missing)}"


def test_version_is_recorded():
  assert re.fullmatch(r"\d+\.\d+\.\d+", covrl.__version__)

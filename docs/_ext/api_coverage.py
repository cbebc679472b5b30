"""The API reference lists every public name: a Sphinx extension and the check it runs.

`undocumented()` reads the `.. autosummary::` directives of docs/api/*.rst (qualified by the
`.. currentmodule::` in force) and returns the names of `covrl.__all__` that none of them lists.
At build time the extension logs a warning for each, which `sphinx-build -W` turns into a failed
build; tests/test_docs.py runs the same check without Sphinx.
"""

import pathlib
import re

API = pathlib.Path(__file__).resolve().parents[1] / "api"
# Metadata, not API: not listed.
EXEMPT = {"__version__"}

_DIRECTIVE = re.compile(r"^\.\.\s+([\w:-]+)::\s*(\S*)")


def documented(api_dir: pathlib.Path = API) -> set[str]:
  """The fully qualified names listed by the autosummary directives of the API pages."""
  names = set()
  for path in sorted(api_dir.glob("*.rst")):
    module, in_autosummary = "", False
    for line in path.read_text().splitlines():
      match = _DIRECTIVE.match(line)
      if match:
        directive, argument = match.groups()
        in_autosummary = directive == "autosummary"
        if directive in ("currentmodule", "py:currentmodule"):
          module = argument
        continue
      if not in_autosummary:
        continue
      if line and not line[0].isspace():  # the directive's body has ended
        in_autosummary = False
        continue
      entry = line.strip()
      if not entry or entry.startswith(":"):  # blank lines and options
        continue
      entry = entry.lstrip("~").split()[0]
      names.add(f"{module}.{entry}" if module else entry)
  return names


def undocumented(api_dir: pathlib.Path = API) -> list[str]:
  """Names of `covrl.__all__` that no autosummary directive of the API pages lists."""
  import covrl

  listed = documented(api_dir)
  return [name for name in covrl.__all__
          if name not in EXEMPT and f"covrl.{name}" not in listed]


def _check(app) -> None:
  from sphinx.util import logging

  logger = logging.getLogger(__name__)
  for name in undocumented():
    logger.warning("covrl.%s is public (covrl.__all__) but not in the API reference "
                   "(add it to an autosummary directive of docs/api/)", name,
                   type="covrl", subtype="api_coverage")


def setup(app):
  app.connect("builder-inited", _check)
  return {"parallel_read_safe": True, "parallel_write_safe": True}

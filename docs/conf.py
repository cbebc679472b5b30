"""Sphinx configuration of covrl's documentation (built in CI with warnings as errors)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
sys.path.insert(0, os.path.abspath("_ext"))

import covrl

project = "covrl"
author = "The covrl authors"
release = covrl.__version__
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.autosummary",
    "myst_nb",  # MyST markdown (the guides) and notebooks; it includes myst_parser
    "api_coverage",  # docs/_ext: every name of covrl.__all__ is in the API reference
    "measured",  # docs/_ext: measured tables read from the benchmarks' JSON files
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "_ext", "**/.ipynb_checkpoints"]
templates_path = ["_templates"]
# The API pages list the public names; autosummary writes a page for each (docs/api/_autosummary,
# generated at every build, not committed).
autosummary_generate = True
autosummary_imported_members = True
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the docstrings say what each argument is
# The flat public names are listed in docs/api/index.rst, and autosummary writes a page for each
# from docs/_templates/autosummary (a class with its documented members: the docstring's Attributes
# section documents the fields); the subpackages' pages list their members by hand.
autodoc_default_options = {}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = False
napoleon_use_ivar = True
# `name` in a docstring is code, not a cross-reference.
default_role = "code"
html_theme = "sphinx_book_theme"
html_title = f"covrl {release}"
html_theme_options = {
    "repository_url": "https://github.com/covrl/covrl",
    "repository_branch": "main",
    "path_to_docs": "docs",
    "use_repository_button": True,
    # The getting-started notebook opens on Colab from its page (it also has a badge).
    "launch_buttons": {"colab_url": "https://colab.research.google.com"},
}
myst_heading_anchors = 3
# The getting-started notebook (the only notebook in the manual) is executed at every build, on
# the builder's CPU; an error in any of its cells fails the build.
nb_execution_mode = "force"
nb_execution_timeout = 120
nb_execution_raise_on_error = True
nb_execution_show_tb = True
suppress_warnings = ["myst.header"]


def _data_docstring(app, what, name, obj, options, lines):
  """A constant re-exported by `covrl` (covrl.METHODS) has its `#:` comment in the module that
  defines it, not in covrl/__init__.py: use that comment, not the docstring of its type."""
  if what != "data" or not name.startswith("covrl."):
    return
  from sphinx.pycode import ModuleAnalyzer

  attr = name.rsplit(".", 1)[1]
  for module_name, module in sorted(sys.modules.items()):
    if not module_name.startswith("covrl") or getattr(module, attr, None) is not obj:
      continue
    try:
      doc = ModuleAnalyzer.for_module(module_name).find_attr_docs().get(("", attr))
    except Exception:  # a module without source: keep looking
      continue
    if doc:
      lines[:] = list(doc)
      return


def setup(app):
  app.connect("autodoc-process-docstring", _data_docstring)

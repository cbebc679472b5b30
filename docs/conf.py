"""Sphinx configuration of covrl's documentation (built in CI with warnings as errors)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import covrl

project = "covrl"
author = "The covrl authors"
release = covrl.__version__
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the docstrings say what each argument is
# Members are listed per module in docs/api/*.rst; classes show their docstring (whose Attributes
# section documents the fields) and the methods listed for them.
autodoc_default_options = {}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = False
napoleon_use_ivar = True
# `name` in a docstring is code, not a cross-reference.
default_role = "code"
html_theme = "alabaster"
html_title = f"covrl {release}"
myst_heading_anchors = 3
suppress_warnings = ["myst.header"]

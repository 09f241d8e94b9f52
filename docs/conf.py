"""Sphinx configuration of the documentation site (issue #20).

Build (from the repository root; warnings are errors, as in CI)::

    pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html

Pages: the README, the method text, the how-to pages of docs/, an API reference generated from
the docstrings of models/, protocols/ and analysis/ (autosummary + autodoc + napoleon; the
``.. math::`` blocks render with MathJax), and the notebooks of notebooks/ (``docs/notebooks`` is
a link to it), executed at build time by MyST-NB and cached in docs/_build/.jupyter_cache, so a
rebuild re-executes only the notebooks that changed.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the packages import without an install too
# the notebooks' kernels inherit this environment: without MPLBACKEND (CI sets Agg) they use
# Jupyter's inline backend, so their figures become outputs of the pages
os.environ.pop("MPLBACKEND", None)

project = "lee2018-snn"
author = "lee2018-snn contributors"
copyright = "2026, lee2018-snn contributors"

extensions = [
    "myst_nb",  # Markdown (MyST) pages and notebooks; loads myst_parser
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}  # .rst first: autosummary writes its stubs with the first
exclude_patterns = ["_build", "**.ipynb_checkpoints", "notebooks/conftest.py", "Thumbs.db"]
templates_path = ["_templates"]

# MyST: $...$ and $$...$$ math, \begin{align} environments, GitHub-style heading anchors
# (method.md's table of contents links to "#1-networks" etc.)
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# links to files outside the site (code, configs, results) stay plain text in the sources;
# a page added to docs/ builds (and is searchable) before index.md links it
suppress_warnings = ["myst.xref_missing", "toc.not_included"]

# MyST-NB: execute notebooks at build time, cached; a failing cell fails the build (-W)
nb_execution_mode = "cache"
nb_execution_cache_path = str(ROOT / "docs" / "_build" / ".jupyter_cache")
nb_execution_timeout = 1800  # per cell; a loaded 2-core machine needs the margin
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

# API reference: one page per module, generated at build time into docs/api/generated
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "show-inheritance": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
# optional GPU / export back-ends: documented without being installed
autodoc_mock_imports = ["cupy", "brian2genn", "brian2cuda", "pygenn"]
napoleon_google_docstring = True
napoleon_numpy_docstring = True
napoleon_use_ivar = True

html_theme = "furo"
html_title = "lee2018-snn"
html_static_path = []

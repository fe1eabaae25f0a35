"""Sphinx configuration of the morsock documentation.

Build (the ``docs`` extra installs Sphinx and the theme)::

    pip install -e '.[docs]'
    sphinx-build -W --keep-going -b html docs build/docs

The build needs no network: the Python inventory for intersphinx is the copy in
``docs/_intersphinx/python3.inv`` (the ``objects.inv`` of the Python 3 documentation);
replace that file with a newer ``https://docs.python.org/3/objects.inv`` to refresh it.
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
# The package from the source tree, installed or not.
sys.path.insert(0, os.path.dirname(HERE))

import morsock  # noqa: E402

project = "morsock"
author = "the morsock authors"
copyright = "morsock authors, MIT licence"
release = morsock.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
]

root_doc = "index"
exclude_patterns = ["_build", "_intersphinx"]
templates_path: list[str] = []
nitpicky = False

# -- autodoc: the API reference is generated from the docstrings --------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "fully-qualified"
autodoc_default_options = {
    "show-inheritance": True,
}
# Optional extras whose packages need not be installed to document the modules using them.
autodoc_mock_imports = ["redis"]
python_use_unqualified_type_names = True

# -- intersphinx: links into the Python documentation, from the local inventory -------------
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", (os.path.join(HERE, "_intersphinx", "python3.inv"),)),
}
intersphinx_timeout = 5

# -- HTML --------------------------------------------------------------------------------
try:
    import furo  # noqa: F401
    html_theme = "furo"
except ImportError:  # the built-in theme: the site still builds without the docs extra
    html_theme = "alabaster"
html_title = f"morsock {release}"
html_static_path: list[str] = []
html_show_sourcelink = False


def _component_signature(app: Any, what: str, name: str, obj: Any, options: Any,
                         signature: str | None, return_annotation: str | None) -> Any:
    """Show a component's ``__init__`` arguments, not the ``*args, **kwargs`` of the
    ``__new__`` its base class defines."""
    from morsock._component import Component
    from sphinx.util.inspect import stringify_signature

    if what == "class" and isinstance(obj, type) and issubclass(obj, Component) \
            and "__init__" in vars(obj):
        sig = inspect.signature(obj.__init__)
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])
        return stringify_signature(sig, show_return_annotation=False), None
    return None


def setup(app: Any) -> None:
    app.connect("autodoc-process-signature", _component_signature)

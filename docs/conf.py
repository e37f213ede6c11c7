"""Sphinx configuration: Markdown pages (MyST), the furo theme, autodoc (Google style).

Build: ``sphinx-build -b html -W -n --keep-going docs docs/_build/html`` (``nox -s
docs``); every warning, including an unresolved cross-reference, is an error.
"""

from __future__ import annotations

import pkgutil
import re
from importlib.metadata import version as _version
from typing import Any

from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer

import mailstrom_async
import mailstrom_async.testing

project = "mailstrom_async"
author = "the mailstrom_async authors"
copyright = "the mailstrom_async authors"
release = _version("mailstrom-async")
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
# examples/ holds runnable files, shown with literalinclude and run by
# tests/test_docs_examples.py; they are not pages.
exclude_patterns = ["_build", "examples"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
# Show the alias, linked to its entry, rather than the Literal it stands for.
autodoc_type_aliases = {"DelivererMode": "mailstrom_async.DelivererMode"}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "furo"
html_title = f"mailstrom_async {release}"
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True

# No intersphinx: the build machines reach no documentation sites. Names from the
# standard library that appear in signatures and annotations cannot be resolved,
# so -n would flag them; they are listed here, and nothing of ours is.
nitpick_ignore = [
    ("py:class", "collections.abc.Callable"),
    ("py:class", "collections.abc.Collection"),
    ("py:class", "collections.abc.Iterable"),
    ("py:class", "collections.abc.Mapping"),
    ("py:class", "collections.abc.Sequence"),
    ("py:class", "contextlib.AbstractContextManager"),
    ("py:class", "datetime"),  # attrs fields annotated with the imported name
    ("py:class", "datetime.datetime"),
    ("py:class", "email.message.EmailMessage"),
    ("py:class", "EmailMessage"),  # attrs fields annotated with the imported name
    ("py:class", "os.PathLike"),
    ("py:class", "pathlib.Path"),
    ("py:class", "random.Random"),
    # anyio's start protocol (ChangeWatchingStore.watch_changes).
    ("py:class", "TaskStatus"),
    ("py:class", "anyio.abc.TaskStatus"),
    # Telemetry's optional OpenTelemetry providers (documented by OpenTelemetry).
    ("py:class", "MeterProvider"),
    ("py:class", "TracerProvider"),
]


# -- public names defined in private modules ---------------------------------------
#
# mailstrom_async/__init__.py sets the __module__ of everything it exports to
# "mailstrom_async", so that reprs and these docs say mailstrom_async.Config. Sphinx
# looks for attribute docstrings ("""...""" after a field) and for source code in
# the module named by __module__, which then holds only imports. The helpers below
# look in the private module that defines each public name instead.

_PUBLIC = set(mailstrom_async.__all__) | set(mailstrom_async.testing.__all__)
# The modules whose __module__ the public names say (the testing kit's too).
_PUBLIC_MODULES = ("mailstrom_async.testing", "mailstrom_async")


def _analyzers() -> list[tuple[str, ModuleAnalyzer]]:
    modules = pkgutil.walk_packages(mailstrom_async.__path__, "mailstrom_async.")
    return [
        (module.name, ModuleAnalyzer.for_module(module.name))
        for module in modules
        if module.name.rpartition(".")[2] != "__main__"  # analysing it runs the CLI
    ]


_ATTRIBUTE_DOCS: dict[tuple[str, str], list[str]] = {}
_DEFINED_IN: dict[str, str] = {}
for _modname, _analyzer in _analyzers():
    for (_qualname, _attr), _doc in _analyzer.find_attr_docs().items():
        if (_qualname or _attr) in _PUBLIC:
            _ATTRIBUTE_DOCS.setdefault((_qualname, _attr), list(_doc))
    for _tag in _analyzer.find_tags():
        if _tag in _PUBLIC:
            _DEFINED_IN.setdefault(_tag, _modname)


def _add_attribute_docs(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """Give fields, enum members and constants their docstrings from the source."""
    module = next((m for m in _PUBLIC_MODULES if name.startswith(f"{m}.")), None)
    if what not in ("attribute", "data") or module is None:
        return
    qualname, _, attr = name.removeprefix(f"{module}.").rpartition(".")
    doc = _ATTRIBUTE_DOCS.get((qualname, attr))
    if doc is not None:
        lines[:] = doc
    elif what == "data" or lines == _type_doc(obj):
        # Without a docstring of its own, autodoc shows that of the value's type
        # (str, RetryPolicy, an enum): say nothing rather than something wrong.
        lines.clear()


def _type_doc(obj: Any) -> list[str]:
    from sphinx.util.docstrings import prepare_docstring

    doc = type(obj).__doc__
    return prepare_docstring(doc) if doc else []


def _follow_imported(app: Sphinx, modname: str, attribute: str) -> str | None:
    """viewcode: find ``mailstrom_async.Config``'s source in its defining module."""
    if modname in _PUBLIC_MODULES:
        return _DEFINED_IN.get(attribute.partition(".")[0])
    return None


def _name_function_defaults(
    app: Sphinx,
    what: str,
    name: str,
    obj: Any,
    options: Any,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str | None, str | None]:
    """Show ``clock=_utcnow`` rather than ``clock=<function _utcnow>``.

    The repr is not Python, so Sphinx could not parse the signature and would show
    it as plain text, without links. (``autodoc_preserve_defaults`` would do this
    too, but it shows attrs defaults as ``attr_dict['to'].default``.)
    """
    if signature is not None:
        signature = re.sub(r"<function ([\w.]+)>", r"\1", signature)
    return signature, return_annotation


def setup(app: Sphinx) -> None:
    # After napoleon (priority 500): these docstrings are plain reST, and napoleon
    # would read "Text; ``None``: more" in an attribute docstring as a type.
    app.connect("autodoc-process-docstring", _add_attribute_docs, priority=600)
    app.connect("viewcode-follow-imported", _follow_imported)
    app.connect("autodoc-process-signature", _name_function_defaults)

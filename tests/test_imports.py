"""Third-party and blocking libraries are imported only by the module that owns them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mailstrom_async

PACKAGE_DIR = Path(mailstrom_async.__file__).parent
ROOT = PACKAGE_DIR.parent

# top-level module name -> the files (relative to the repository) allowed to import it
OWNERS: dict[str, set[str]] = {
    "aiosmtplib": {"mailstrom_async/_smtp.py"},
    "aiodns": {"mailstrom_async/_dns.py"},
    "pycares": {"mailstrom_async/_dns.py"},
    "aiosqlite": {"mailstrom_async/_store/_sqlite.py"},
    "sqlite3": {"mailstrom_async/_store/_sqlite.py"},
    "asyncpg": {"mailstrom_async/_store/_postgres.py"},
    "smtplib": set(),
    "opentelemetry": {"mailstrom_async/_telemetry.py"},
    # IDNA 2008 (issue 11): every domain for DNS or the wire goes through _domain.
    "idna": {"mailstrom_async/_domain.py"},
    "pytest_asyncio": {"mailstrom_async/testing/_plugin.py"},
    # The testing kit's fixtures and contract suites, and only they, need pytest (the
    # "testing" extra); its package imports them lazily, so Outbox does not.
    "pytest": {
        "mailstrom_async/testing/_plugin.py",
        "mailstrom_async/testing/_store_contract.py",
        "mailstrom_async/testing/_hold_contract.py",
        "mailstrom_async/testing/_history_contract.py",
        "mailstrom_async/testing/_inspect_contract.py",
        "mailstrom_async/testing/_lease_contract.py",
        "mailstrom_async/testing/_batch_contract.py",
    },
}


def _imported_modules(tree: ast.AST) -> set[str]:
    """Top-level names of every module a parsed file imports, however it does it.

    Counts ``import x.y``, ``from x.y import z`` and ``importlib.import_module("x")``
    / ``__import__("x")`` with a literal name, wherever they are (also under
    ``if TYPE_CHECKING:`` and inside functions). Relative imports are the package's
    own and are skipped.
    """
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = (
                func.attr
                if isinstance(func, ast.Attribute)
                else func.id
                if isinstance(func, ast.Name)
                else None
            )
            arg = node.args[0]
            if (
                name in {"import_module", "__import__"}
                and isinstance(arg, ast.Constant)
                and isinstance(arg.value, str)
            ):
                found.add(arg.value.split(".")[0])
    return found


def _package_files() -> list[Path]:
    return sorted(PACKAGE_DIR.rglob("*.py"))


def test_imported_modules_finds_every_form() -> None:
    """The scanner sees plain, dotted, from-, nested and dynamic imports, not relative ones."""
    source = """
import aiosmtplib.errors
from aiodns import DNSResolver
from . import sibling
from .aiosqlite import x
import importlib
def f():
    import sqlite3 as db
    importlib.import_module("smtplib")
    __import__("json.decoder")
if TYPE_CHECKING:
    from ssl import SSLContext
"""
    assert _imported_modules(ast.parse(source)) == {
        "aiosmtplib",
        "aiodns",
        "importlib",
        "sqlite3",
        "smtplib",
        "json",
        "ssl",
    }


def test_package_files_found() -> None:
    """The scan covers the package, including the _store subpackage."""
    names = {p.relative_to(ROOT).as_posix() for p in _package_files()}
    assert "mailstrom_async/__init__.py" in names
    assert "mailstrom_async/_models.py" in names
    assert any(n.startswith("mailstrom_async/_store/") for n in names)


@pytest.mark.parametrize(
    "path", _package_files(), ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_owned_libraries_imported_only_by_owner(path: Path) -> None:
    """aiosmtplib, aiodns, aiosqlite and sqlite3 are imported only by their owning module; smtplib never."""
    rel = path.relative_to(ROOT).as_posix()
    imported = _imported_modules(ast.parse(path.read_text(encoding="utf-8"), rel))
    trespassing = sorted(
        module
        for module, owners in OWNERS.items()
        if module in imported and rel not in owners
    )
    assert trespassing == []

"""Chores, one command each: ``nox -s lint typecheck tests docs demo bench soak``."""

from __future__ import annotations

import os

import nox

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "typecheck", "tests", "docs"]

PYPROJECT = nox.project.load_toml("pyproject.toml")


def group(name: str) -> tuple[str, ...]:
    return tuple(nox.project.dependency_groups(PYPROJECT, name))


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite with branch coverage and enforce the coverage gate."""
    session.install("-e", ".", *group("tests"))
    session.run("coverage", "erase")
    session.run("coverage", "run", "-m", "pytest", *session.posargs)
    session.run("coverage", "combine", success_codes=[0, 1])
    session.run("coverage", "report")


@nox.session
def lint(session: nox.Session) -> None:
    """Formatting, lint rules, spelling, pyproject validity and import layers."""
    session.install("-e", ".", *group("lint"))
    session.run("ruff", "format", "--check", ".")
    session.run("ruff", "check", ".")
    session.run("codespell", "mailstrom_async", "tests", "docs", "README.md")
    session.run("validate-pyproject", "pyproject.toml")
    session.run("lint-imports")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package, the tests and this file."""
    session.install("-e", ".", *group("typecheck"), "nox")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the docs; every warning is an error."""
    session.install("-e", ".", *group("docs"))
    args = ["-W", "-n", "--keep-going", "docs", "docs/_build/html"]
    session.run("sphinx-build", "-b", "html", *args)


@nox.session
def demo(session: nox.Session) -> None:
    """A real end-to-end delivery to a loopback SMTP server, with the SQLite store."""
    session.install("-e", ".")
    session.run("mailstrom-async", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against smtp-source and raw aiosmtplib; ``-- --quick`` for a smoke run.

    Needs Postfix's smtp-sink and smtp-source (``apt-get install postfix``).
    ``BENCH_UVLOOP=1`` also installs uvloop, which adds the uvloop variants.
    """
    session.install("-e", ".[postgres]")  # the PostgreSQL scenarios
    if os.environ.get("BENCH_UVLOOP") == "1":
        session.install("uvloop")
    session.run("python", "-m", "bench", *session.posargs)


@nox.session
def soak(session: nox.Session) -> None:
    """Kill cycles: SIGKILL a delivering process 200 times, then check the books.

    The harness of tests/test_crash_restart.py's kill-cycle test, longer: prints
    acked, lost, duplicates (explained or not, flagged or not), the recovery time
    after the last restart and the 250-to-commit window; exit status 1 on any
    problem. ``-- --cycles N``, ``--seed N`` (replays a plan), ``--help``.
    """
    session.install("-e", ".", *group("tests"))
    session.run("python", "-m", "tests.kill_cycles", *session.posargs)

"""The README's first two commands: what CI runs, and what the docs repeat."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def first_commands(path: Path) -> list[str]:
    """The commands of the first ``console`` block of *path*, comments removed."""
    text = path.read_text(encoding="utf-8")
    match = re.search(r"```console\n(.*?)```", text, re.S)
    assert match is not None, f"{path.name} has no console block"
    lines = [line.split("  #", 1)[0].strip() for line in match.group(1).splitlines()]
    return [line for line in lines if line]


def test_readme_starts_with_the_demo_and_the_tests() -> None:
    """The first block is two commands: the main job (the demo), then the tests,
    each working in a fresh clone on its own (neither needs the other first)."""
    demo, tests = first_commands(ROOT / "README.md")
    assert demo.endswith("nox -s demo")
    assert tests.endswith("nox -s tests")
    # Both install nox into a virtual environment: PEP 668 refuses it outside one.
    for command in (demo, tests):
        assert command.startswith("python3 -m venv .venv && ")


def test_docs_repeat_the_readme_commands() -> None:
    assert first_commands(ROOT / "docs" / "index.md") == first_commands(
        ROOT / "README.md"
    )


def test_ci_reads_the_commands_out_of_the_readme() -> None:
    """CI runs what .ci/readme-commands prints: the README's commands, as written."""
    printed = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "readme-commands")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert printed == first_commands(ROOT / "README.md")
    assert len(printed) == 2

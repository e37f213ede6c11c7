"""The mailstrom-async command, run as a real process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mailstrom_async._cli import main


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailstrom_async", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_demo_delivers_defers_and_fails(tmp_path: Path) -> None:
    """The demo shows DELIVERED, DEFERRED-then-DELIVERED and FAILED recipients."""
    store = tmp_path / "demo.sqlite3"
    result = run("demo", "--messages", "2", "--store", str(store))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "deferred  busy@example.org  (451 Mailbox busy" in out
    assert "failed    nobody@example.com  (550 No such user here)" in out
    rows = [
        line.split()
        for line in out.splitlines()
        if "@example." in line and "  " in line
    ]
    table = {(r[1], r[2]) for r in rows if len(r) >= 4 and r[2].isupper()}
    assert ("busy@example.org", "DELIVERED") in table
    assert ("nobody@example.com", "FAILED") in table
    assert ("alice@example.com", "DELIVERED") in table
    assert "5 delivered, 1 failed" in out
    assert store.exists()


def test_demo_rejects_a_bad_count(capsys: pytest.CaptureFixture[str]) -> None:
    """A message count below one is one clear error line and exit code 2."""
    assert main(["demo", "--messages", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "mailstrom-async: error: --messages must be at least 1"
    )


def test_help_lists_the_demo() -> None:
    """--help names every subcommand."""
    result = run("--help")
    assert result.returncode == 0
    assert "demo" in result.stdout


def test_store_in_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    """An unusable store path is reported in one line, without a traceback."""
    result = run("demo", "--store", str(tmp_path / "missing" / "q.sqlite3"))
    assert result.returncode == 1
    assert result.stderr.startswith("mailstrom-async: error:")
    assert "Traceback" not in result.stderr


def test_mx_demo_walks_mx_hosts_and_dns_outcomes() -> None:
    """demo --mx delivers via the second MX when the first refuses, and fails
    null-MX and NXDOMAIN recipients without connecting."""
    result = run("demo", "--mx")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "delivered alice@example.com  (via mx2.example.com 127.0.0.3)" in out
    assert "failed    carol@nomail.example.org  (556 " in out
    assert "failed    dave@no-such-domain.example  (550 " in out
    assert "mx1.example.com (127.0.0.2) refused 1 session(s)" in out

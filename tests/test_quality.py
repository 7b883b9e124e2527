"""Lint and type checks, run with the test suite where the dev tools are installed (CI installs them)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    pytest.importorskip(module)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT)


def test_ruff_lint_and_format():
    lint = _run("ruff", "check", "gpuckpt", "tests", "benchmarks", "tools")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = _run("ruff", "format", "--check", "gpuckpt", "tests", "benchmarks", "tools")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy():
    result = _run("mypy", "gpuckpt")
    assert result.returncode == 0, result.stdout + result.stderr

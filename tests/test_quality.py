"""Lint, format and type checks run as part of the suite, exactly as configured in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [name for name in ("service", "tests", "scripts", "bench") if (ROOT / name).is_dir()]
CHECKS = {
    "ruff": ["ruff", "check", *SOURCES],
    "ruff-format": ["ruff", "format", "--check", *SOURCES],
    "mypy": ["mypy"],
}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_static_checks(name: str) -> None:
    command = [sys.executable, "-m", *CHECKS[name]]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(CHECKS[name])} failed:\n{result.stdout}\n{result.stderr}"

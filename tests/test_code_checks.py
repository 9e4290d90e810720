"""The project's static checks, run with the tests: lint, types, import boundaries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*cmd: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in (".", "service", "operator"))}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"


def test_ruff() -> None:
    _run(str(BIN / "ruff"), "check", ".")


def test_mypy() -> None:
    _run(sys.executable, "-m", "mypy")


def test_import_boundaries() -> None:
    _run(str(BIN / "lint-imports"))

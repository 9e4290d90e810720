"""The seed example from upstream's docs runs unchanged: as a test and as a script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from examples.seed import catdetector_seed

ROOT = Path(__file__).resolve().parents[2]


async def test_seed_example_as_a_test() -> None:
    await catdetector_seed.main()


def test_seed_example_as_a_script() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples/seed/catdetector_seed.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "seed example passed" in result.stdout

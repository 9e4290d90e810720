"""aqueduct-serve sweeps what a killed container of its pod left in /dev/shm before it does anything else."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

from aqueduct._runtime.shm import SHM_DIR


def test_the_serving_pod_sweeps_stale_segments_at_start(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    stale = Path(SHM_DIR) / f"aqd-{int(done.stdout)}-{secrets.token_hex(4)}-arena"  # a dead process's arena
    stale.write_bytes(b"\0" * 4096)
    try:
        # The config is missing: the pod exits 2 at once, after the sweep.
        proc = subprocess.run(
            [sys.executable, "-m", "aqueduct_service", "--config", str(tmp_path / "none.yaml")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        assert not stale.exists()
    finally:
        stale.unlink(missing_ok=True)

"""A rolling update under load drops nothing: bench/zero_drop_rollout.py (two real serving pods behind a
readiness-following round-robin proxy, each replaced the way the Deployment controller and the kubelet
do with the operator's rendered Deployment), run short. Without the preStop pause the same run drops
requests, which shows the check can tell."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.timeout(300)
BENCH = ROOT / "bench" / "zero_drop_rollout.py"


def test_rolling_update_drops_no_request(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    args = [sys.executable, str(BENCH), "--drain", "2", "--sync-delay", "0.5", "--concurrency", "4",
            "--settle", "0.5", "--logs", str(tmp_path / "logs"), "--json", str(out)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the bench stops its pods on SIGTERM
        output, _ = proc.communicate(timeout=60)
        pytest.fail(f"the bench did not finish within 240 s:\n{output}")
    assert proc.returncode == 0, output
    figures = json.loads(out.read_text())

    paused = figures["with_pause"]
    assert paused["pre_stop"] == "sleep 2" and paused["pods_replaced"] == 2
    assert paused["requests"] >= 100, output
    assert paused["failed"] == 0, output
    assert [t["exit_code"] for t in paused["terminations"]] == [0, 0]  # drained and exited on SIGTERM

    baseline = figures["without_pause"]
    assert baseline["pre_stop"] == "(none)" and baseline["failed"] > 0, output

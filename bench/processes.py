"""What the benchmark runners and the tests need of the servers they start: a free port, the
processes of a server's process group (from /proc: their state and CPU time), and a bounded stop."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def group_processes(pgid: int) -> dict[int, tuple[str, float]]:
    """The processes of process group ``pgid``: pid -> (state letter, CPU seconds used so far)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid:
            found[int(entry)] = (fields[0], (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return found


def group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    return [pid for pid, (state, _) in group_processes(pgid).items() if state not in ("Z", "X")]


def terminate(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM ``proc``, wait up to ``grace`` seconds for it to end, then SIGKILL it."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)

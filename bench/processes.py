"""What the benchmark runners need to know about the servers they start: a free port, and the
processes of a server's process group (from /proc: their state and CPU time)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

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

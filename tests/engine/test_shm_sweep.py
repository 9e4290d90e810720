"""Stale shared-memory segments are swept at start: those of dead processes, and those older than the running
process that now holds their pid (a restarted container's processes get the same pids); live ones stay."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aqueduct import sweep_stale_segments
from aqueduct._runtime.shm import SHM_DIR

HOUR = 3600.0


@pytest.fixture
def made() -> Iterator[list[Path]]:
    """Segment files a test makes; whatever is left is removed afterwards."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        path.unlink(missing_ok=True)


def segment(made: list[Path], name: str, age: float = 0.0) -> Path:
    """A segment file named ``name`` whose modification time is ``age`` seconds ago."""
    path = Path(SHM_DIR) / name
    path.write_bytes(b"\0" * 4096)
    if age:
        then = time.time() - age
        os.utime(path, (then, then))
    made.append(path)
    return path


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True,
                          text=True)
    return int(proc.stdout)


def tag() -> str:
    return secrets.token_hex(4)


@pytest.fixture
def live_process() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def test_segments_of_dead_processes_go_and_live_ones_stay(
    made: list[Path], live_process: subprocess.Popen[bytes]
) -> None:
    dead = dead_pid()
    flow_of_dead = segment(made, f"aqd-{dead}-{tag()}-arena")
    task_of_dead = segment(made, f"aqd-task-{dead}-{tag()}")
    # A live process: what it made since it started stays, whatever its age; so do names not aqueduct's.
    other = live_process.pid
    of_live = segment(made, f"aqd-{other}-{tag()}-0")
    of_this = segment(made, f"aqd-{os.getpid()}-{tag()}-0")
    foreign = segment(made, f"not-aqd-{dead}-{tag()}")
    # A segment named for the live pid but older than that process: its predecessor's (pid reuse).
    predecessor = segment(made, f"aqd-{other}-{tag()}-arena", age=HOUR)

    removed = sweep_stale_segments()

    assert not flow_of_dead.exists() and not task_of_dead.exists() and not predecessor.exists()
    assert of_live.exists() and of_this.exists() and foreign.exists()
    assert removed >= 3
    assert live_process.poll() is None


def test_a_restarted_process_removes_what_its_pid_left_before_it_started(made: list[Path]) -> None:
    """As in a restarted container: pid 1 again, the pod's /dev/shm kept. The new process (here, one whose
    segment is dated before its start) removes the old one's, not those it makes itself."""
    name = tag()
    script = textwrap.dedent(f"""
        import os, time
        from pathlib import Path
        from aqueduct import sweep_stale_segments
        old = Path({SHM_DIR!r}) / f"aqd-{{os.getpid()}}-{name}-arena"
        new = Path({SHM_DIR!r}) / f"aqd-{{os.getpid()}}-{name}-1"
        old.write_bytes(b"x")
        then = time.time() - {HOUR}
        os.utime(old, (then, then))
        new.write_bytes(b"x")
        sweep_stale_segments()
        print(old.exists(), new.exists())
        new.unlink()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]



def test_a_segment_that_cannot_be_removed_does_not_stop_the_sweep(
    made: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another user's segment in a shared /dev/shm (sticky: only its owner may remove it) is left; the pod starts."""
    from aqueduct._runtime import shm

    dead = dead_pid()
    theirs = segment(made, f"aqd-{dead}-{tag()}-arena")
    ours = segment(made, f"aqd-{dead}-{tag()}-0")
    real_unlink = shm.unlink

    def unlink(name: str) -> None:
        if name == theirs.name:
            raise PermissionError(1, "Operation not permitted", name)
        real_unlink(name)

    monkeypatch.setattr(shm, "unlink", unlink)
    sweep_stale_segments()
    assert theirs.exists() and not ours.exists()


KILLED_FLOW = """
import asyncio, os, sys
import numpy as np
from aqueduct import Flow, FlowStep
from tests.engine.handlers import Doubler, Task

async def main():
    flow = Flow(FlowStep(Doubler(), nprocs=2), arena_bytes=32 * 1024 * 1024)
    flow.start()
    task = Task(np.ones(1 << 20, dtype=np.float32))  # 4 MiB: through the arena, and back through an output arena
    await flow.process(task, timeout_sec=60)
    print(os.getpid(), flush=True)
    sys.stdin.read()

asyncio.run(main())
"""


def test_what_a_killed_flow_leaves_behind_is_swept_by_the_next_start() -> None:
    """Issue 18: the main process and its workers SIGKILLed together leave their segments (a 32 MiB arena);
    the next start removes them."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_FLOW], cwd=root, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())
        left = sorted(name for name in os.listdir(SHM_DIR) if name.startswith(f"aqd-{pid}-"))
        assert any(name.endswith("-out-arena") for name in left) and len(left) >= 2, left
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the main process and its workers together
        proc.wait(30)
    try:
        assert all((Path(SHM_DIR) / name).exists() for name in left)  # nobody cleaned up
        sweep_stale_segments()
        assert not any((Path(SHM_DIR) / name).exists() for name in left)
    finally:
        for name in left:
            (Path(SHM_DIR) / name).unlink(missing_ok=True)

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from aqueduct._runtime.shm import SHM_DIR


def _segments() -> set[str]:
    return {name for name in os.listdir(SHM_DIR) if name.startswith(f"aqd-{os.getpid()}-")}


@pytest.fixture
def no_shm_leaks() -> Iterator[None]:
    """Fails the test if it leaves shared-memory segments of this process's flows behind."""
    before = _segments()
    yield
    left = _segments() - before
    assert not left, f"segments left in {SHM_DIR}: {sorted(left)}"


def children_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive

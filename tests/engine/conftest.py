from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from aqueduct import Flow
from aqueduct._runtime.arena import Lease
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


@contextmanager
def leased_arrays(flow: Flow, count: int, nbytes: int = 256 * 1024) -> Iterator[list[np.ndarray]]:
    """``count`` float64 arrays of ``nbytes`` each over leases of ``flow``'s arena, freed on exit."""
    leases: list[Lease] = []
    try:
        for _ in range(count):
            lease = flow.lease(nbytes)
            assert lease is not None, "the flow's arena has no room"
            leases.append(lease)
        yield [np.frombuffer(lease.buffer, dtype=np.float64) for lease in leases]
    finally:
        for lease in leases:
            lease.free()


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

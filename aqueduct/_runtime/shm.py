"""Named shared-memory segments in /dev/shm, owned by one flow.

Every segment's name starts with its flow's prefix, so a flow (or a worker that outlives its
parent) can sweep whatever is left with one directory scan. Segments are mapped with ``mmap``
directly, not through ``multiprocessing.shared_memory``: no resource tracker, and a mapping stays
valid after its name is unlinked, so a receiver owns the memory as long as an array refers to it.
"""

from __future__ import annotations

import itertools
import mmap
import os
import secrets

import numpy as np

SHM_DIR = "/dev/shm"
_counter = itertools.count()


def new_flow_prefix() -> str:
    """A prefix unique to one flow in this process: ``aqd-<pid>-<random>``."""
    return f"aqd-{os.getpid()}-{secrets.token_hex(4)}"


class Segment:
    """One mapped segment: its name, its mapping and the address range the mapping covers."""

    __slots__ = ("name", "mm", "base", "size")

    def __init__(self, name: str, mm: mmap.mmap, size: int) -> None:
        self.name = name
        self.mm = mm
        self.size = size
        self.base = np.frombuffer(mm, dtype=np.uint8, count=size).ctypes.data if size else 0

    @classmethod
    def create(cls, prefix: str, data: memoryview) -> Segment:
        """Create a segment named ``<prefix>-<n>`` holding a copy of ``data``."""
        size = data.nbytes
        name = f"{prefix}-{next(_counter)}"
        fd = os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        seg = cls(name, mm, size)
        np.frombuffer(mm, dtype=np.uint8, count=size)[:] = np.frombuffer(data, dtype=np.uint8)
        return seg

    @classmethod
    def open(cls, name: str, size: int) -> Segment:
        """Map an existing segment by name."""
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, mm, size)

    def find(self, address: int, nbytes: int) -> int | None:
        """Offset of ``[address, address + nbytes)`` inside this mapping, or None."""
        if self.base <= address and address + nbytes <= self.base + self.size:
            return address - self.base
        return None

    def view(self, offset: int, nbytes: int) -> memoryview:
        """A writable view of part of the mapping."""
        return memoryview(self.mm)[offset : offset + nbytes]

    def unlink(self) -> None:
        """Remove the name; the mapping stays valid for whoever still holds it."""
        unlink(self.name)


def unlink(name: str) -> None:
    """Remove one segment name; a name already gone is fine."""
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


def sweep(prefix: str) -> int:
    """Unlink every segment whose name starts with ``prefix``; returns how many were removed."""
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        if name.startswith(prefix):
            unlink(name)
            removed += 1
    return removed

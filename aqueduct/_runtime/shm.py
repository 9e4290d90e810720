"""Named shared-memory segments in /dev/shm, owned by one flow.

Every segment's name starts with its flow's prefix, so a flow (or a worker that outlives its
parent) can sweep whatever is left with one directory scan. Segments are mapped with ``mmap``
directly, not through ``multiprocessing.shared_memory``: no resource tracker, and a mapping stays
valid after its name is unlinked, so a receiver owns the memory as long as an array refers to it.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import re
import secrets
import time
from collections import OrderedDict

import numpy as np

SHM_DIR = "/dev/shm"
_counter = itertools.count()


def new_flow_prefix() -> str:
    """A prefix unique to one flow in this process: ``aqd-<pid>-<random>``."""
    return f"aqd-{os.getpid()}-{secrets.token_hex(4)}"


class Segment:
    """One mapped segment: its name, its mapping and the address range the mapping covers.

    A worker maps arenas copy-on-write (``pristine`` is then a read-only shared mapping of the same
    memory): what a handler writes into its task's arrays stays in the worker, see ``map_arenas_privately``.
    """

    __slots__ = ("name", "mm", "base", "size", "pristine", "clean")

    def __init__(self, name: str, mm: mmap.mmap, size: int, pristine: mmap.mmap | None = None) -> None:
        self.name = name
        self.mm = mm
        self.size = size
        self.base = np.frombuffer(mm, dtype=np.uint8, count=size).ctypes.data if size else 0
        self.pristine = pristine
        #: Known to hold no page of this process's own (``check_clean``): nothing to compare or drop.
        self.clean = False

    @classmethod
    def create(cls, prefix: str, data: memoryview) -> Segment:
        """Create a segment named ``<prefix>-<n>`` holding a copy of ``data``."""
        seg = cls.allocate(f"{prefix}-{next(_counter)}", data.nbytes)
        np.frombuffer(seg.mm, dtype=np.uint8, count=seg.size)[:] = np.frombuffer(data, dtype=np.uint8)
        return seg

    @classmethod
    def allocate(cls, name: str, size: int) -> Segment:
        """Create an empty segment named ``name`` of ``size`` bytes (its pages are taken as they are written)."""
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(name, mm, size)

    @classmethod
    def open(cls, name: str, size: int, private: bool = False) -> Segment:
        """Map an existing segment by name; ``private``: copy-on-write, beside a read-only shared mapping."""
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            if not private:
                return cls(name, mmap.mmap(fd, size), size)
            return cls(
                name, mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE), size, mmap.mmap(fd, size, prot=mmap.PROT_READ)
            )
        finally:
            os.close(fd)

    def check_clean(self, start: int, end: int) -> None:
        """Find out once whether ``[start, end)``, where a batch's blocks lie, holds pages of our own."""
        if self.pristine is not None:
            self.clean = not _has_own_pages(self.base + start, end - start)

    def changed(self, offset: int, nbytes: int) -> bool:
        """Whether this process wrote different bytes into ``[offset, offset + nbytes)`` of a private mapping."""
        if self.pristine is None or self.clean or not _has_own_pages(self.base + offset, nbytes):
            return False
        ours = np.frombuffer(self.mm, dtype=np.uint8, count=nbytes, offset=offset)
        shared = np.frombuffer(self.pristine, dtype=np.uint8, count=nbytes, offset=offset)
        return not np.array_equal(ours, shared)

    def forget_writes(self, offset: int, nbytes: int) -> None:
        """Drop this process's copies of the pages of ``[offset, offset + nbytes)`` of a private mapping:
        they show the shared memory again (a later task in the same block must not see our old writes)."""
        if self.pristine is None or self.clean or not _has_own_pages(self.base + offset, nbytes):
            return
        start = offset // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(self.size, -(-(offset + nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE)
        self.mm.madvise(mmap.MADV_DONTNEED, start, end - start)

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


# /proc/self/pagemap: 8 bytes per page; bit 63 present, 62 swapped, 61 a page of a file or shared memory.
_PAGE_OWN_MASK = np.uint64((1 << 63) | (1 << 61))
_PAGE_OWN = np.uint64(1 << 63)  # present and not the file's: a copy-on-write copy
_PAGE_SWAPPED = np.uint64(1 << 62)
_pagemap: tuple[int, int] | None = None  # (pid, fd): /proc/self is the process that opened it


def _has_own_pages(address: int, nbytes: int) -> bool:
    """Whether the pages of ``[address, address + nbytes)`` include one this process copied on write
    (True where the kernel does not say: the caller then compares or drops pages, which is only slower)."""
    global _pagemap
    pid = os.getpid()
    if _pagemap is None or _pagemap[0] != pid:
        try:
            _pagemap = (pid, os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            return True
    first = address // mmap.PAGESIZE
    pages = (address + nbytes - 1) // mmap.PAGESIZE - first + 1
    try:
        entries = np.frombuffer(os.pread(_pagemap[1], 8 * pages, 8 * first), dtype=np.uint64)
    except OSError:
        return True
    return bool(np.any((entries & _PAGE_OWN_MASK) == _PAGE_OWN) or np.any(entries & _PAGE_SWAPPED))


#: Long-lived segments (arenas) this process mapped, most recently used last.
_arenas: OrderedDict[str, Segment] = OrderedDict()
ARENA_SUFFIX = "-arena"
_MAX_ARENAS = 16
_private_arenas = False


def map_arenas_privately() -> None:
    """From now on, map arenas copy-on-write in this process (a worker).

    A handler may change its task's arrays in place. Were they views of the caller's shared memory,
    the change would reach memory that is not the worker's: a request body that is about to be read
    again (its task is run once more after its worker died) or that already belongs to another request.
    With a private mapping the change stays in the worker: ``codec.encode`` sends a changed array by
    value, and ``Segment.forget_writes`` drops the worker's copies once the batch is answered.
    """
    global _private_arenas
    _private_arenas = True
    _arenas.clear()  # mapped shared before a fork


def open_cached(name: str, size: int) -> Segment:
    """Map a segment, once per process when it is an arena (its name ends with ``ARENA_SUFFIX``).

    Up to ``_MAX_ARENAS`` arenas stay mapped; the least recently used is dropped first (its memory
    goes when no array refers to it any more).
    """
    if not name.endswith(ARENA_SUFFIX):
        return Segment.open(name, size)
    seg = _arenas.get(name)
    if seg is not None and seg.size == size:
        _arenas.move_to_end(name)
        return seg
    seg = Segment.open(name, size, private=_private_arenas)
    _arenas[name] = seg
    while len(_arenas) > _MAX_ARENAS:
        _arenas.popitem(last=False)
    return seg


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


# Names of the segments aqueduct makes: a flow's ``aqd-<pid>-<random>-...``, a task's ``aqd-task-<pid>-<n>``.
_SEGMENT_PID = re.compile(r"^aqd-(?:task-)?([0-9]+)-")
# How much earlier than a process's start a segment must be to count as older (tick rounding, clock reads).
_START_SLACK = 0.1


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (``time.time()`` seconds); None if no such process runs, -inf if it runs
    but its start cannot be read (then nothing named for it is older than it)."""
    if not 0 < pid < 2**31:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # it runs, as another user
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        ticks = int(stat[stat.rindex(b")") + 2 :].split()[19])  # field 22, starttime, in clock ticks after boot
    except (OSError, ValueError, IndexError):
        return -math.inf
    since_boot = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - since_boot


def sweep_stale() -> int:
    """Unlink the segments no running process made: those named for a pid that is not running, and those
    named for a running pid but older than that process (it reuses a dead process's pid). Returns how many.

    A pod's serving process calls this at start, before its flow makes segments: a container that was
    killed leaves its segments in the pod's ``/dev/shm`` (an ``emptyDir`` that outlives the container), and
    the restarted container's processes get the same pids again (its main process is pid 1 both times).
    A segment's age is the older of its modification and status-change times; a running process's start is
    read from ``/proc/<pid>/stat``. Safe only where every process sharing ``/dev/shm`` shares this pid
    namespace (a pod's container with its own ``/dev/shm``; a host, not a container run with ``--ipc=host``).
    Does nothing without ``/proc``.
    """
    if not os.path.isdir("/proc/self"):
        return 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    starts: dict[int, float | None] = {}
    removed = 0
    for name in names:
        match = _SEGMENT_PID.match(name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid not in starts:
            starts[pid] = _process_start(pid)
        start = starts[pid]
        if start is not None:
            try:
                info = os.stat(os.path.join(SHM_DIR, name))
            except OSError:
                continue
            if min(info.st_mtime, info.st_ctime) >= start - _START_SLACK:
                continue
        try:
            unlink(name)
        except OSError:  # another user's, in a shared /dev/shm (sticky): theirs to remove
            continue
        removed += 1
    return removed

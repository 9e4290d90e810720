"""A reusable shared-memory arena: one segment, handed out as leases in ring order.

The process that owns the arena leases blocks from it (a request body read off a socket, say), and
frees them when it is done; workers map the arena once and see the blocks as numpy arrays through
the codec's segment references. Leases are mostly freed in the order they were taken, so a ring
suits: a new lease goes after the newest live one, and space comes back as the oldest ones are
freed. When no room is left, ``lease`` returns None and the caller falls back to plain memory.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from .shm import ARENA_SUFFIX, Segment

_ALIGN = 64
#: Names of output arenas end so; readers copy what they find there and free the block.
OUTPUT_ARENA_SUFFIX = "-out" + ARENA_SUFFIX
#: An output block starts with this many bytes of header: byte 0 is 1 while the block is unread, 0 once freed.
_HEADER = 64
#: An output block nobody freed (its reader died) is taken back this long after its task's deadline.
_ORPHAN_GRACE_S = 30.0


class Lease:
    """A block of an arena: ``buffer`` is a writable view of exactly the bytes asked for.

    The block goes back to the arena once every holder let go of it: the caller who leased it
    (``free()``) and each task in flight that carries arrays over it (``retain()``/``release()``, done
    by the flow: a task's hold ends when no worker can still read or write its data, whenever its
    caller stopped waiting). So a caller may ``free()`` as soon as it is done with the answer, also
    after a timeout, without the block being handed to a new request while a worker still uses it.
    """

    __slots__ = ("_arena", "_block", "_holds", "_caller_done", "buffer")

    def __init__(self, arena: Arena, block: list[Any], nbytes: int) -> None:
        self._arena = arena
        self._block = block
        self._holds = 1  # the caller's
        self._caller_done = False
        self.buffer = arena.segment.view(block[0], nbytes)

    def free(self) -> None:
        """The caller is done with the block; idempotent. Arrays over ``buffer`` must not be used afterwards."""
        if self._caller_done:
            return
        self._caller_done = True
        self.release()

    def retain(self) -> None:
        """One more holder (a task in flight): the block stays leased until a matching ``release()``."""
        self._holds += 1

    def release(self) -> None:
        """A holder let go; the block goes back to the arena when none is left."""
        self._holds -= 1
        if self._holds == 0:
            self._block[2] = 1
            self._arena.reclaim()

    @property
    def held(self) -> bool:
        """The block is still leased (some holder has not let go)."""
        return self._holds > 0


class Arena:
    """One shared segment named ``<prefix>-arena`` of ``size`` bytes, leased in ring order."""

    def __init__(self, prefix: str, size: int, suffix: str = ARENA_SUFFIX) -> None:
        self.segment = Segment.allocate(prefix + suffix, size)
        self.name = self.segment.name
        self.size = size
        self._blocks: deque[list[Any]] = deque()  # [start, end, freed, ...], oldest first
        self._head = 0  # where the next block starts

    def lease(self, nbytes: int) -> Lease | None:
        """A block of ``nbytes`` bytes, or None when the arena has no room for it now."""
        block = self._place(nbytes)
        return None if block is None else Lease(self, block, nbytes)

    def _place(self, nbytes: int, *extra: float) -> list[Any] | None:
        """Reserve room for ``nbytes`` after the newest block: ``[start, end, freed, *extra]``, or None."""
        need = max(_ALIGN, (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN)
        if not self._blocks:
            start = 0 if need <= self.size else -1
        else:
            tail = self._blocks[0][0]
            head = self._head
            if head > tail:  # live blocks lie in [tail, head): room after head, or from 0 to tail
                start = head if head + need <= self.size else (0 if need <= tail else -1)
            else:  # wrapped: live blocks lie in [tail, size) and [0, head)
                start = head if head + need <= tail else -1
        if start < 0:
            return None
        block: list[Any] = [start, start + need, 0, *extra]
        self._blocks.append(block)
        self._head = start + need
        return block

    def reclaim(self) -> None:
        """Take back the space of the oldest blocks that were freed."""
        blocks = self._blocks
        while blocks and blocks[0][2]:
            blocks.popleft()
        if not blocks:
            self._head = 0

    def unlink(self) -> None:
        """Remove the arena's name (mappings stay valid for whoever holds them)."""
        self.segment.unlink()


class OutputArena(Arena):
    """A worker's arena for the large outputs it sends back: written here, freed by whoever reads them.

    A block's first byte, in shared memory, says whether it is still unread; the reader (the process
    that gets the task's answer, or the flow's process for an answer nobody will read) copies the
    data out and clears it with ``free_output``. Each block is freed once, by one process. A block
    whose reader died is taken back ``_ORPHAN_GRACE_S`` after its task's deadline.
    """

    def __init__(self, prefix: str, size: int) -> None:
        super().__init__(prefix, size, OUTPUT_ARENA_SUFFIX)

    def put(self, data: memoryview, expires_at: float) -> int | None:
        """Copy ``data`` into a new block; the offset of the copy, or None when there is no room now."""
        self._take_back()
        block = self._place(_HEADER + data.nbytes, expires_at)
        if block is None:
            return None
        start: int = block[0]
        offset = start + _HEADER
        self.segment.view(offset, data.nbytes)[:] = data.cast("B")
        self.segment.mm[start] = 1
        return offset

    def _take_back(self) -> None:
        blocks = self._blocks
        mm = self.segment.mm
        now = time.monotonic()
        while blocks and (mm[blocks[0][0]] == 0 or now > blocks[0][3] + _ORPHAN_GRACE_S):
            blocks.popleft()
        if not blocks:
            self._head = 0


def free_output(segment: Segment, offset: int) -> None:
    """Free the output block whose data starts at ``offset`` (its reader is done with it)."""
    segment.mm[offset - _HEADER] = 0

"""A reusable shared-memory arena: one segment, handed out as leases in ring order.

The process that owns the arena leases blocks from it (a request body read off a socket, say), and
frees them when it is done; workers map the arena once and see the blocks as numpy arrays through
the codec's segment references. Leases are mostly freed in the order they were taken, so a ring
suits: a new lease goes after the newest live one, and space comes back as the oldest ones are
freed. When no room is left, ``lease`` returns None and the caller falls back to plain memory.
"""

from __future__ import annotations

from collections import deque

from .shm import ARENA_SUFFIX, Segment

_ALIGN = 64


class Lease:
    """A block of an arena: ``buffer`` is a writable view of exactly the bytes asked for."""

    __slots__ = ("_arena", "_block", "buffer")

    def __init__(self, arena: Arena, block: list[int], nbytes: int) -> None:
        self._arena = arena
        self._block = block
        self.buffer = arena.segment.view(block[0], nbytes)

    def free(self) -> None:
        """Give the block back; idempotent. Arrays over ``buffer`` must not be used afterwards."""
        if self._block[2]:
            return
        self._block[2] = 1
        self._arena.reclaim()


class Arena:
    """One shared segment named ``<prefix>-arena`` of ``size`` bytes, leased in ring order."""

    def __init__(self, prefix: str, size: int) -> None:
        self.segment = Segment.allocate(prefix + ARENA_SUFFIX, size)
        self.name = self.segment.name
        self.size = size
        self._blocks: deque[list[int]] = deque()  # [start, end, freed], oldest first
        self._head = 0  # where the next block starts

    def lease(self, nbytes: int) -> Lease | None:
        """A block of ``nbytes`` bytes, or None when the arena has no room for it now."""
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
        block = [start, start + need, 0]
        self._blocks.append(block)
        self._head = start + need
        return Lease(self, block, nbytes)

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

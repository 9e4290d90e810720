"""Length-prefixed pickled messages over OS pipes.

Workers block on their pipes; the parent reads and writes them from its event loop with
``add_reader``/``add_writer`` and never blocks.
"""

from __future__ import annotations

import asyncio
import errno
import os
import pickle
import select
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

_HEADER = struct.Struct("<Q")
_READ_CHUNK = 1 << 20
#: How long to poll a pipe before sleeping on it. A process that sleeps takes tens of microseconds
#: to wake up on an idle machine, longer than a no-op round trip takes; polling briefly avoids that.
SPIN_S = 0.0001


def spin_until_readable(fd: int, seconds: float = SPIN_S) -> bool:
    """Poll ``fd`` for up to ``seconds`` without sleeping; True as soon as it is readable."""
    deadline = time.perf_counter() + seconds
    while True:
        if select.select([fd], [], [], 0)[0]:
            return True
        if time.perf_counter() >= deadline:
            return False


def pack(message: Any) -> bytes:
    """One frame: an 8-byte length, then the pickled message."""
    body = pickle.dumps(message, protocol=5)
    return _HEADER.pack(len(body)) + body


def write_blocking(fd: int, frame: bytes) -> None:
    """Write a whole frame to a blocking fd."""
    view = memoryview(frame)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, _READ_CHUNK))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_blocking(fd: int) -> Any:
    """Read one message from a blocking fd; ``None`` when the writer has closed its end."""
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    body = _read_exactly(fd, length)
    if body is None:
        return None
    return pickle.loads(body)


class FrameParser:
    """Splits a byte stream into messages."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        """Add bytes; return the messages completed by them."""
        buf = self._buffer
        buf += data
        messages = []
        start = 0
        end = len(buf)
        while end - start >= _HEADER.size:
            (length,) = _HEADER.unpack_from(buf, start)
            if end - start - _HEADER.size < length:
                break
            body_start = start + _HEADER.size
            messages.append(pickle.loads(memoryview(buf)[body_start : body_start + length]))
            start = body_start + length
        if start:
            del buf[:start]
        return messages


class LoopReader:
    """Reads messages from a non-blocking fd on an event loop and passes them to a callback."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        on_message: Callable[[Any], None],
        on_eof: Callable[[], None] | None = None,
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._on_message = on_message
        self._on_eof = on_eof
        self._parser = FrameParser()
        self.closed = False
        os.set_blocking(fd, False)
        loop.add_reader(fd, self.drain)

    def drain(self) -> None:
        """Read all that is available now (also called once more when the writer died)."""
        while not self.closed:
            try:
                data = os.read(self._fd, _READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.close()
                if self._on_eof is not None:
                    self._on_eof()
                return
            for message in self._parser.feed(data):
                self._on_message(message)

    def close(self) -> None:
        """Stop reading and close the fd."""
        if not self.closed:
            self.closed = True
            self._loop.remove_reader(self._fd)
            os.close(self._fd)


class LoopWriter:
    """Writes frames to a non-blocking fd from an event loop, buffering what the pipe cannot take yet."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self._loop = loop
        self._fd = fd
        self._backlog: deque[memoryview] = deque()
        self.closed = False
        os.set_blocking(fd, False)

    def write(self, frame: bytes) -> None:
        """Queue a frame; writes at once what the pipe takes."""
        if self.closed:
            return
        if self._backlog:
            self._backlog.append(memoryview(frame))
            return
        view = memoryview(frame)
        try:
            written = os.write(self._fd, view)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.EBADF):
                return  # the reader is gone; its death is handled through its process sentinel
            raise
        if written < len(view):
            self._backlog.append(view[written:])
            self._loop.add_writer(self._fd, self._flush)

    def _flush(self) -> None:
        while self._backlog:
            view = self._backlog[0]
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                return
            except OSError:
                self._backlog.clear()
                break
            if written < len(view):
                self._backlog[0] = view[written:]
                return
            self._backlog.popleft()
        self._loop.remove_writer(self._fd)

    def close(self) -> None:
        """Drop what is buffered and close the fd: the worker reads end-of-file and exits."""
        if not self.closed:
            self.closed = True
            if self._backlog:
                self._backlog.clear()
                self._loop.remove_writer(self._fd)
            os.close(self._fd)

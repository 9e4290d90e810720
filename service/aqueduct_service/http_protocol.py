"""uvicorn's httptools protocol, sending each response in one system call.

uvicorn writes a response's status line and headers, then its body, as two writes on the socket: two
sends, each costing as much as much of the rest of a small request's work in a front end (about a
tenth of a front end's CPU at 4,000 requests/s). Here a write is held until the next one, which is
sent with it, or until the event loop's next step, whichever comes first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: Largest write joined to the one held before it.
_JOIN_MAX = 64 * 1024


class _CombinedWrites:
    """A transport proxy that joins a write to the one after it (or sends it on the loop's next step)."""

    __slots__ = ("_transport", "_loop", "_held")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is None:
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
            return
        self._held = None
        if len(data) <= _JOIN_MAX:
            self._transport.write(held + data)
        else:  # a copy would cost more than the second send
            self._transport.write(held)
            self._transport.write(data)

    def flush(self) -> None:
        """Send what is held."""
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CombinedWritesProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` whose responses leave in one send (pass as ``uvicorn.Config(http=...)``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CombinedWrites(transport, self.loop))  # type: ignore[arg-type]

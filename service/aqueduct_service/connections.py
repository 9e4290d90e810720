"""Connection hygiene: bounds on a request's head, on its body's time, on idle connections and on their number.

uvicorn's httptools protocol takes any header size, waits for a request head or a body forever and
accepts connections until the process runs out of file descriptors: a slowloris client, a body sent
one byte a second or a few thousand idle connections hold a front end. Here, per connection:

- the request head (request line and headers) may take ``max_header_bytes``; beyond it the answer is
  ``431 Request Header Fields Too Large`` and the connection is closed;
- the head must arrive within ``header_timeout`` seconds of the connection's start, or of the first
  byte of a later request; an idle keep-alive connection is closed after ``keepalive_timeout``
  (uvicorn's own timer), one that never sends a byte after ``header_timeout`` (``408``, closed);
- the body must arrive within ``body_timeout`` seconds of its head, else the connection is closed
  (the app sees the client gone); on SIGTERM a body still arriving gets ``SHUTDOWN_BODY_GRACE_S`` more;
- at ``max_connections`` open connections in this process, a new one takes the place of the oldest
  connection that has no request in progress (idle, kept alive, or still sending a head), which is
  closed; when every one has a request in progress, the new one is answered ``503`` with
  ``Retry-After`` and closed at once. So idle connections cannot lock clients out, and the process
  keeps its descriptors.
"""

from __future__ import annotations

import asyncio
import itertools
import resource
from dataclasses import dataclass

from .http_protocol import CombinedWritesProtocol

#: Seconds a body still arriving when the server is told to stop may take before its connection closes.
SHUTDOWN_BODY_GRACE_S = 1.0


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-process bounds on the HTTP connections (see the module docstring); defaults as the config's."""

    max_header_bytes: int = 64 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections: int = 1000


def _response(status: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n" + extra + b"\r\n"


_TOO_LARGE = _response(b"431 Request Header Fields Too Large")
_TIMEOUT = _response(b"408 Request Timeout")
_BUSY = _response(b"503 Service Unavailable", b"retry-after: 1\r\n")
_opened = itertools.count()


class GuardedProtocol(CombinedWritesProtocol):
    """The pod's HTTP protocol: ``CombinedWritesProtocol`` within ``limits`` (a subclass sets them)."""

    limits = ConnectionLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._received = 0  # bytes of the current head read so far (a head that never ends is cut by this)
        self._head_bytes = 0  # its request line and headers, as parsed
        self._in_head = True
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None
        self._opened = next(_opened)  # the order connections came in (the loop's clock ticks per iteration)
        self._served = False  # refused at once: uvicorn never saw it
        if len(self.connections) >= self.limits.max_connections and not self._make_room():
            transport.write(_BUSY)
            transport.close()
            return
        self._served = True
        super().connection_made(transport)
        self._arm(self.limits.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._served:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            self._received += len(data)
        super().data_received(data)
        if self._in_head and self._received > self.limits.max_header_bytes:  # at most one read past the limit
            self._refuse(_TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        if not self._in_head:  # a later request on a kept-alive connection: its head starts now
            self._in_head = True
            self._received = 0
            self._arm(self.limits.header_timeout, self._head_timed_out)

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._received = 0
        if self._head_bytes > self.limits.max_header_bytes:
            self._refuse(_TOO_LARGE)
            return
        self._arm(self.limits.body_timeout, self._body_timed_out)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        super().on_message_complete()

    def shutdown(self) -> None:
        if self._receiving_body():
            self._arm(SHUTDOWN_BODY_GRACE_S, self._body_timed_out)
        super().shutdown()

    def _receiving_body(self) -> bool:
        cycle = self.cycle
        return self._timer is not None and not self._in_head and cycle is not None and cycle.more_body

    def _make_room(self) -> bool:
        """Whether a new connection may be served at the cap: connections closing already do not count,
        else the oldest one with no request in progress is closed; False when every one has a request."""
        live = [c for c in self.connections if not c.transport.is_closing()]
        if len(live) < self.limits.max_connections:
            return True
        idle = [c for c in live if isinstance(c, GuardedProtocol) and c._between_requests()]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c._opened)
        oldest._refuse(_TIMEOUT)
        return True

    def _between_requests(self) -> bool:
        cycle = self.cycle
        return not self._refused and (cycle is None or (cycle.response_complete and not self.pipeline))

    def _arm(self, delay: float, callback: object) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)  # type: ignore[arg-type]

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        if self._in_head:
            self._refuse(_TIMEOUT)

    def _body_timed_out(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.close()  # the app's receive() sees the client gone

    def _refuse(self, response: bytes) -> None:
        self._refused = True
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedProtocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)`` for ``limits``."""
    return type("GuardedProtocol", (GuardedProtocol,), {"limits": limits})


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (connections are files); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft

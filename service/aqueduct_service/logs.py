"""The pod's one log: every record (uvicorn's, the engine's, the workers', the pod's own) on stderr, as JSON
lines in a container or plain text on a terminal (``server.log_format``).

A JSON line holds ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, ``pipeline`` (the model's name), ``pod``
(on Kubernetes), and, where the record is about a request, ``request_id`` and ``step``; a record's
``extra`` fields and its traceback (``exc_info``) are there too. Formatting is python-json-logger's.

The request a record is about is a context variable (``REQUEST_ID``), set for each request as it
arrives: every record logged while it is answered carries its id, from any logger.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import sys
import threading
import time
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from aqueduct.exceptions import FlowError, QueueFullError, TaskError, TaskTimeoutError

#: The id of the request being answered in this context (``X-Request-Id``, the OIP ``id``, or generated).
REQUEST_ID: ContextVar[str | None] = ContextVar("aqueduct_request_id", default=None)

log = logging.getLogger("aqueduct_service")
access_log = logging.getLogger("aqueduct_service.access")

_JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
_RENAMED = {"asctime": "time", "levelname": "level", "name": "logger"}
#: Record attributes never written as fields: logging's own, and uvicorn's copy of the message in colour.
_RESERVED = (*RESERVED_ATTRS, "color_message")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Fields a text line shows after the message, when the record has them.
_TEXT_CONTEXT = ("request_id", "step", "error_type")
_MAX_REQUEST_ID = 128


class _Context(logging.Filter):
    """Puts the request id of the current context on every record that has none of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            request_id = REQUEST_ID.get()
            if request_id is not None:
                record.request_id = request_id
        return True


class _JsonFormatter(JsonFormatter):
    """python-json-logger's, with the time in ISO 8601 (UTC, milliseconds)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        return datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")


class _TextFormatter(logging.Formatter):
    """``time level logger: message [request_id=... step=...]``, the traceback below."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        context = " ".join(f"{key}={getattr(record, key)}" for key in _TEXT_CONTEXT if hasattr(record, key))
        traceback_text = getattr(record, "traceback", None)
        return f"{line} [{context}]{_indented(traceback_text)}" if context else line + _indented(traceback_text)


def _indented(text: str | None) -> str:
    return "\n" + text.rstrip() if text else ""


def configure_logging(log_format: str, level: str, pipeline: str, **static: Any) -> None:
    """Send every record of this process to stderr in ``log_format``: ``json``, ``text``, or ``auto``
    (text on a terminal, else JSON); ``static`` fields (e.g. ``frontend=1``) are on every JSON line.

    The root logger gets the one handler: loggers that propagate (uvicorn's, with ``log_config=None``,
    the engine's, the handlers') all write through it; the flow's workers, forked after this, inherit it.
    """
    if log_format == "auto":
        log_format = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        fields: dict[str, Any] = {"pipeline": pipeline, **static}
        pod = os.environ.get("POD_NAME") or (socket.gethostname() if "KUBERNETES_SERVICE_HOST" in os.environ else None)
        if pod:
            fields["pod"] = pod
        handler.setFormatter(
            _JsonFormatter(_JSON_FIELDS, rename_fields=_RENAMED, static_fields=fields, reserved_attrs=_RESERVED)
        )
    else:
        handler.setFormatter(_TextFormatter(_TEXT_FORMAT))
    handler.addFilter(_Context())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


class RateLimit:
    """At most ``burst`` events at once and ``rate`` a second on average (a token bucket); thread-safe."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._dropped = 0
        self._lock = threading.Lock()

    def take(self) -> int | None:
        """None: over the limit (the event is dropped); else how many were dropped since the last one let through."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens < 1:
                self._dropped += 1
                return None
            self._tokens -= 1
            dropped, self._dropped = self._dropped, 0
            return dropped


class FailureLog:
    """One line per failed task (step, error type and message; the request id comes from the context).

    A handler's traceback goes on its line while ``tracebacks`` allows (by default 10 a minute, so that a
    storm of bad inputs cannot flood the log); lines themselves are limited by ``lines`` (100 a second).
    Either limit counts what it dropped and says so on the next line it lets through.
    """

    def __init__(self, lines: RateLimit | None = None, tracebacks: RateLimit | None = None) -> None:
        self.lines = lines or RateLimit(100.0, 100)
        self.tracebacks = tracebacks or RateLimit(10 / 60, 10)

    def task_failed(self, error: FlowError) -> None:
        """Log ``error``, which ``Flow.process`` raised for the request of this context."""
        dropped = self.lines.take()
        if dropped is None:
            return
        extra: dict[str, Any] = {"error_type": type(error).__name__}
        if dropped:
            extra["lines_dropped"] = dropped
        if isinstance(error, TaskError):
            extra.update(step=error.step, error_type=error.exc_type)
            message = f"step {error.step!r}: {error.during} {error.exc_type}: {error.exc_message}"
            if error.traceback_text:
                suppressed = self.tracebacks.take()
                if suppressed is not None:
                    extra["traceback"] = error.traceback_text
                    if suppressed:
                        extra["tracebacks_dropped"] = suppressed
            log.error("task failed: %s", message, extra=extra)
            return
        level = logging.WARNING if isinstance(error, QueueFullError | TaskTimeoutError) else logging.ERROR
        log.log(level, "task failed: %s: %s", type(error).__name__, error, extra=extra)


class AccessLog:
    """An INFO line per answered request (logger ``aqueduct_service.access``) for a ``sample`` of them, taken
    evenly: 1 logs every request, 0.01 one in a hundred, 0 none."""

    def __init__(self, sample: float) -> None:
        self.every = round(1 / sample) if sample > 0 else 0
        self._count = 0

    def __call__(self, method: str, path: str, status: int, seconds: float) -> None:
        """Log one answered request, if it is in the sample."""
        if not self.every:
            return
        self._count += 1
        if self._count % self.every:
            return
        duration_ms = round(seconds * 1000, 3)
        extra = {"method": method, "path": path, "status": status, "duration_ms": duration_ms}
        access_log.info("%s %s %d %.1f ms", method, path, status, duration_ms, extra=extra)


class _RequestIds:
    """16 hex digits: 8 random per process, then a counter (no system call per request)."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = os.urandom(4).hex()
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter) & 0xFFFF_FFFF:08x}"


#: A fresh request id, unique in the pod (each HTTP process draws its own random half).
new_request_id = _RequestIds()


def header_request_id(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The request's ``X-Request-Id``, when it has one of 1 to 128 printable ASCII characters (else None)."""
    for key, value in headers:
        if key == b"x-request-id":
            if 0 < len(value) <= _MAX_REQUEST_ID and value.isascii() and value.decode().isprintable():
                return value.decode()
            return None
    return None


def bind_request_id(body_id: str | None) -> str:
    """The id of this context's request: its header's, else the OIP body's ``id``, else a new one; set in
    ``REQUEST_ID`` for the rest of the request."""
    request_id = REQUEST_ID.get() or body_id or new_request_id()
    REQUEST_ID.set(request_id)
    return request_id

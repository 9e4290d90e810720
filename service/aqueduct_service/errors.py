"""Every failure the pod answers with, and the one table mapping engine errors to HTTP statuses."""

from __future__ import annotations

from typing import Any

from aqueduct.exceptions import (
    FlowError,
    NotRunningError,
    QueueFullError,
    TaskCancelledError,
    TaskError,
    TaskTimeoutError,
    WorkerDiedError,
)

RETRY_AFTER_SECONDS = "1"


class InferenceError(Exception):
    """A request the pod answers with ``status`` and the OIP error body ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.extra: dict[str, Any] = {}
        #: The gRPC status code's name where the HTTP status does not tell it (a full queue: RESOURCE_EXHAUSTED).
        self.grpc_code: str | None = None


# (engine error, HTTP status, retry later?) -- the first matching row wins.
ENGINE_ERRORS: tuple[tuple[type[FlowError], int, bool], ...] = (
    (TaskError, 500, False),
    (TaskTimeoutError, 504, False),
    (QueueFullError, 503, True),
    (WorkerDiedError, 503, True),
    (TaskCancelledError, 503, True),
    (NotRunningError, 503, True),
)


def from_engine_error(exc: FlowError) -> InferenceError:
    """The HTTP answer for an error ``Flow.process`` raised."""
    status, retry = next(((s, r) for t, s, r in ENGINE_ERRORS if isinstance(exc, t)), (500, False))
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if retry else {}
    if isinstance(exc, TaskError):
        error = InferenceError(status, f"{exc.exc_type}: {exc.exc_message}", headers)
        error.extra = {"exc_type": exc.exc_type, "exc_message": exc.exc_message, "step": exc.step}
        return error
    error = InferenceError(status, f"{type(exc).__name__}: {exc}", headers)
    if isinstance(exc, QueueFullError):
        error.grpc_code = "RESOURCE_EXHAUSTED"
    return error

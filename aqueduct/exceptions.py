"""The engine's error tree.

Upstream aqueduct's names (``AqueductError``, ``FlowError``, ``NotRunningError``,
``MPStartMethodValueError``, ``BadReferenceCount``) keep their meaning, so code that catches them
keeps working. The subclasses below say *why* ``Flow.process`` failed, so a caller (the serving pod
maps them to HTTP statuses) can tell a bad task from a full queue from a deadline.
"""

from __future__ import annotations


class AqueductError(Exception):
    """Base class for all aqueduct errors."""


class FlowError(AqueductError):
    """A flow could not do what was asked of it."""


class MPStartMethodValueError(FlowError, ValueError):
    """The flow's multiprocessing start method differs from the one the main module set."""


class NotRunningError(FlowError):
    """``process()`` was called before ``start()`` or after ``stop()``."""


class BadReferenceCount(AqueductError, ValueError):
    """Kept for upstream compatibility; this engine does not raise it."""


class FlowStartError(FlowError):
    """``start()`` failed: a worker's ``on_start`` raised, or its process died while starting."""


class FlowStartTimeout(FlowStartError, TimeoutError):
    """``start(timeout=...)`` ran out before every worker finished ``on_start``."""


class TaskTimeoutError(FlowError):
    """The task's deadline (``timeout_sec``) passed before its result came back."""

    def __init__(self, message: str = "Task timeout error") -> None:
        super().__init__(message)


class TaskCancelledError(FlowError):
    """The flow stopped (``stop(graceful=False)`` or a graceful stop's bound ran out) with the task in flight."""

    def __init__(self, message: str = "Task was cancelled") -> None:
        super().__init__(message)


class QueueFullError(FlowError):
    """The flow holds ``queue_size`` waiting tasks already; retry later."""


class WorkerDiedError(FlowError):
    """The worker process that held the task died (killed, crashed, out of memory)."""


class TaskError(FlowError):
    """The step's handler raised for this task, or the task could not travel to or from it.

    Attributes:
        step: name of the step whose handler raised.
        exc_type: qualified name of the exception's class, e.g. ``"ValueError"``.
        exc_message: ``str()`` of the exception.
        traceback_text: the formatted traceback, from the process where it was raised.
        during: what raised it: ``HANDLER`` (the default), or a stage of the task's trip such as
            ``PICKLING_TASK`` (a field the caller set cannot be pickled).
    """

    HANDLER = "handler raised"
    CONDITION = "handle_condition raised"
    PICKLING_TASK = "pickling the task for its worker raised"
    UNPICKLING_TASK = "unpickling the task in its worker raised"
    PICKLING_RESULT = "pickling the task after its handler raised"
    UNPICKLING_RESULT = "unpickling the worker's answer raised"

    def __init__(self, step: str, exc_type: str, exc_message: str, traceback_text: str, during: str = HANDLER) -> None:
        super().__init__(f"step {step!r}: {during} {exc_type}: {exc_message}")
        self.step = step
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.traceback_text = traceback_text
        self.during = during

    def __reduce__(self) -> tuple[type[TaskError], tuple[str, str, str, str, str]]:
        return (TaskError, (self.step, self.exc_type, self.exc_message, self.traceback_text, self.during))

"""aqueduct: a multiprocess batching flow engine, API-compatible with Avito's aqueduct.

Code written for upstream ``aqueduct`` runs unchanged::

    from aqueduct import BaseTask, BaseTaskHandler, Flow, FlowStep
"""

from ._runtime.shm import sweep_stale as sweep_stale_segments
from .exceptions import (
    AqueductError,
    FlowError,
    FlowStartError,
    FlowStartTimeout,
    NotRunningError,
    QueueFullError,
    TaskCancelledError,
    TaskError,
    TaskTimeoutError,
    WorkerDiedError,
)
from .flow import Flow, FlowHealth, FlowState, StepHealth
from .handler import BaseTaskHandler
from .logger import log
from .step import FlowStep
from .task import BaseTask

__all__ = [
    "AqueductError",
    "BaseTask",
    "BaseTaskHandler",
    "Flow",
    "FlowError",
    "FlowHealth",
    "FlowStartError",
    "FlowStartTimeout",
    "FlowState",
    "FlowStep",
    "NotRunningError",
    "QueueFullError",
    "StepHealth",
    "TaskCancelledError",
    "TaskError",
    "TaskTimeoutError",
    "WorkerDiedError",
    "log",
    "sweep_stale_segments",
]

"""``BaseTask``: what travels through a flow."""

from __future__ import annotations

import itertools
import os
import uuid
import weakref
from time import monotonic
from typing import Any

import numpy as np

from ._runtime.codec import SHM_THRESHOLD, OutOfBandBytes
from ._runtime.shm import Segment, unlink

DEFAULT_PRIORITY = 0

#: Attributes that belong to the caller's task and are never overwritten by a worker's copy.
_OWN_FIELDS = frozenset({"task_id", "priority", "weight", "expiration_time", "_shared_fields"})
_SHARE_PREFIX_TEMPLATE = "aqd-task-{pid}"


class _TaskIds:
    """Random version-4 UUIDs without a system call per task: 64 random bits per process, then a counter
    (the text is formatted here: ``uuid.UUID`` costs four times as much)."""

    _VARIANT = 0x8000_0000_0000_0000  # RFC 4122's variant bits, the top two of the counter's half
    _COUNTER = 0x3FFF_FFFF_FFFF_FFFF

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        random = str(uuid.UUID(int=int.from_bytes(os.urandom(16), "big"), version=4))
        self.prefix = random[:19]  # "xxxxxxxx-xxxx-4xxx-": the random half, with the version
        self.counter = itertools.count()

    def __call__(self) -> str:
        low = f"{self._VARIANT | (next(self.counter) & self._COUNTER):016x}"
        return f"{self.prefix}{low[:4]}-{low[4:]}"


_new_task_id = _TaskIds()


class BaseTask:
    """Base class for your tasks: subclass it and add the fields your handlers read and set.

    A task is pickled to the worker processes of each step it passes through; whatever fields the
    handlers set appear on the caller's object when ``Flow.process`` returns. Numpy arrays and
    ``bytes`` of 64 KiB or more travel through shared memory without being copied into a pipe;
    ``share_value(field)`` puts a field in shared memory explicitly.

    Example:
        class ImageTask(BaseTask):
            def __init__(self, image: np.ndarray, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.image = image
                self.label = None
    """

    task_id: str = ""
    priority: int = DEFAULT_PRIORITY
    weight: int = 1
    expiration_time: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shared_fields: dict[str, tuple[Any, Segment | None]] = {}
        self.task_id = _new_task_id()
        self.priority = DEFAULT_PRIORITY

    def __repr__(self) -> str:
        return f"<{self.__class__.__name__} {self.__dict__}>"

    def set_timeout(self, timeout_sec: float) -> None:
        """Set the task's deadline ``timeout_sec`` seconds from now."""
        self.expiration_time = monotonic() + timeout_sec

    def set_priority(self, priority: int) -> None:
        """Set the priority; with ``Flow(queue_priorities=N)`` higher values (up to N-1) are taken first."""
        self.priority = priority

    def set_weight(self, weight: int) -> None:
        """Count the task as ``weight`` toward each step's ``batch_size`` (default 1).

        For a task that carries several rows of a batch (a request of N rows): a worker's batch then
        holds at most ``batch_size`` rows, never a part of a task; a task heavier than ``batch_size``
        is handled in a batch of its own. Without weights a batch holds ``batch_size`` tasks, as upstream.

        Raises:
            ValueError: ``weight`` is not an integer >= 1.
        """
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise ValueError(f"weight must be an integer >= 1, got {weight!r}")
        self.weight = weight

    def is_expired(self) -> bool:
        """Whether the deadline set by ``set_timeout`` has passed."""
        return self.expiration_time is not None and monotonic() >= self.expiration_time

    def share_value(self, field_name: str) -> None:
        """Put the value of ``field_name`` (a numpy array, ``bytes`` or ``bytearray``) in shared memory.

        A numpy array is replaced by an equal array backed by shared memory: the workers map it
        instead of receiving a copy, and changes they make in place are seen by the caller. A
        ``bytes`` value always travels through shared memory, whatever its size. If the field is
        later assigned a new value, call ``share_value`` again to share that one.

        Raises:
            ValueError: the field does not exist, is shared already, or its type cannot be shared.
        """
        if field_name not in self.__dict__:
            raise ValueError("Unknown field name")
        value = self.__dict__[field_name]
        shared = self._shared_fields.get(field_name)
        if shared is not None and shared[0] is value:
            raise ValueError(f"The {field_name} field value is already shared")
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise ValueError("numpy arrays of dtype object cannot be shared")
            data = np.ascontiguousarray(value)
            if data.nbytes == 0:
                self._shared_fields[field_name] = (value, None)
                return
            flat = memoryview(data.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
            seg = Segment.create(_SHARE_PREFIX_TEMPLATE.format(pid=os.getpid()), flat)
            weakref.finalize(self, unlink, seg.name)
            array = np.ndarray(value.shape, dtype=value.dtype, buffer=seg.mm)
            self.__dict__[field_name] = array
            self._shared_fields[field_name] = (array, seg)
        elif isinstance(value, (bytes, bytearray)):
            self._shared_fields[field_name] = (value, None)
        else:
            raise ValueError(f"Type {type(value)} cannot be shared")

    def shared_segments(self) -> dict[str, Segment]:
        """The shared-memory segments made by ``share_value`` that still back a field (internal)."""
        if not self._shared_fields:
            return {}
        return {
            seg.name: seg
            for field, (value, seg) in self._shared_fields.items()
            if seg is not None and self.__dict__.get(field) is value
        }

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__
        wrapped: dict[str, Any] | None = None
        for key, value in state.items():
            if type(value) is bytes and (len(value) >= SHM_THRESHOLD or key in self._shared_fields):
                if wrapped is None:
                    wrapped = dict(state)
                wrapped[key] = OutOfBandBytes(value)
        if wrapped is None:
            if not self._shared_fields:
                return state
            wrapped = dict(state)
        wrapped["_shared_fields"] = {}
        return wrapped

    def update(self, source_task: BaseTask, excluded_fields: set[str] | None = None) -> None:
        """Copy the fields of ``source_task`` (a worker's copy of this task) onto this task."""
        own = _OWN_FIELDS if not excluded_fields else _OWN_FIELDS | excluded_fields
        for field, value in source_task.__dict__.items():
            if field not in own:
                setattr(self, field, value)

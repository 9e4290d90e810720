"""Task (de)serialisation: pickle protocol 5 with large buffers out of band, in shared memory.

A buffer of ``SHM_THRESHOLD`` bytes or more (a numpy array's data, a large ``bytes`` field) is not
copied into the pickle stream. If it already lies inside a segment the receiver can map (one the
task was sent in, or one made by ``share_value``), only a reference travels: ``(name, size,
offset, nbytes)``. Otherwise it is copied once into a new segment. The receiver maps the
segments and unpickles with ``buffers=``, so arrays come out as views of shared memory.
"""

from __future__ import annotations

import io
import math
import pickle
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from .arena import OUTPUT_ARENA_SUFFIX, OutputArena, free_output
from .shm import ARENA_SUFFIX, Segment, open_cached

SHM_THRESHOLD = 64 * 1024

#: (segment name, segment size, offset, nbytes)
BufferRef = tuple[str, int, int, int]
Encoded = tuple[bytes, list[BufferRef]]


def _address(raw: memoryview) -> int:
    return int(np.frombuffer(raw, dtype=np.uint8).ctypes.data)


def _contiguous(pb: pickle.PickleBuffer) -> memoryview | None:
    """The buffer's bytes, or None where they are not contiguous (numpy then copies them in band)."""
    try:
        return pb.raw()
    except BufferError:
        return None


def _reference(raw: memoryview, segments: dict[str, Segment]) -> BufferRef | None:
    """Where ``raw`` lies in one of ``segments``, as a reference; None where it lies in none, or where
    this process changed it in a private mapping (the shared memory does not hold what it holds)."""
    nbytes = raw.nbytes
    address = _address(raw)
    for seg in segments.values():
        offset = seg.find(address, nbytes)
        if offset is not None:
            return None if seg.changed(offset, nbytes) else (seg.name, seg.size, offset, nbytes)
    return None


def encode(
    obj: Any,
    segments: dict[str, Segment],
    prefix: str,
    outputs: OutputArena | None = None,
    expires_at: float = math.inf,
) -> Encoded:
    """Pickle ``obj``; large or already-shared buffers become references to ``segments``.

    A large buffer found in no segment is copied into ``outputs`` (a worker's output arena; its block
    is kept until ``expires_at`` at least, unless its reader frees it) or, without one or when it is
    full, into a new segment named with ``prefix``; either is added to ``segments``.
    """
    refs: list[BufferRef] = []

    def out_of_band(pb: pickle.PickleBuffer) -> bool:
        raw = _contiguous(pb)
        if raw is None or raw.nbytes == 0 or (raw.nbytes < SHM_THRESHOLD and not segments):
            return True
        ref = _reference(raw, segments)
        if ref is not None:
            refs.append(ref)
            return False
        nbytes = raw.nbytes
        if nbytes < SHM_THRESHOLD:
            return True
        if outputs is not None:
            offset = outputs.put(raw, expires_at)
            if offset is not None:
                segments[outputs.name] = outputs.segment
                refs.append((outputs.name, outputs.size, offset, nbytes))
                return False
        seg = Segment.create(prefix, raw)
        segments[seg.name] = seg
        refs.append((seg.name, seg.size, 0, nbytes))
        return False

    if arenas_only(segments):
        return _plain.encode(obj, out_of_band), refs
    # A small array may lie in a task's share_value segment: only the general path sends it by reference.
    return pickle.dumps(obj, protocol=5, buffer_callback=out_of_band), refs


def arenas_only(segments: dict[str, Segment]) -> bool:
    """Whether every segment in ``segments`` is an arena: their small arrays may travel as copies
    (unlike a ``share_value`` segment's, which travel by reference whatever their size)."""
    return all(name.endswith(ARENA_SUFFIX) for name in segments)


class _NotInBand(Exception):
    """A large buffer that lies in no known segment: it cannot travel inside a batch's pickle."""


def encode_batch(objs: list[Any], segments: dict[str, Segment]) -> Encoded | None:
    """Pickle ``objs`` as one list, or return None when one of them cannot be pickled or holds a buffer
    of ``SHM_THRESHOLD`` bytes or more that lies in none of ``segments`` (encode them one by one with
    ``encode``: the one at fault fails alone, and such a buffer is copied to shared memory).

    ``segments`` are arenas (a caller's, whose leases hold request tensors): a large buffer in one of
    them travels as a reference, as with ``encode``. One pickle for a batch of tasks costs a third of
    one pickle per task: their class is looked up once and the names of their fields are written once.
    """
    refs: list[BufferRef] = []

    def out_of_band(pb: pickle.PickleBuffer) -> bool:
        raw = _contiguous(pb)
        if raw is None or raw.nbytes < SHM_THRESHOLD:
            return True
        ref = _reference(raw, segments)
        if ref is None:
            raise _NotInBand
        refs.append(ref)
        return False

    try:
        return _plain.encode(objs, out_of_band), refs
    except Exception:  # noqa: BLE001 - _NotInBand, or a task pickle refuses
        return None


def decode_batch(batch: Encoded, segments: dict[str, Segment]) -> list[Any]:
    """The objects ``encode_batch`` pickled, their large arrays views of ``segments`` (which gets the
    segments it had to map)."""
    objs: list[Any] = decode(batch[0], batch[1], segments)
    return objs


class _PlainEncoder(threading.local):
    """One reusable pickler per thread for tasks that reference no shared segment other than arenas
    (the common case): building a ``Pickler`` and its stream costs more than pickling a small task."""

    def __init__(self) -> None:
        self.stream = io.BytesIO()
        self.callback: Callable[[pickle.PickleBuffer], bool] | None = None
        self.pickler = _SmallArrayPickler(self.stream, protocol=5, buffer_callback=self._out_of_band)
        self.busy = False

    def _out_of_band(self, pb: pickle.PickleBuffer) -> bool:
        assert self.callback is not None
        return self.callback(pb)

    def encode(self, obj: Any, callback: Callable[[pickle.PickleBuffer], bool]) -> bytes:
        if self.busy:  # pickled from within a pickling (a __reduce__ that encodes): no sharing
            stream = io.BytesIO()
            _SmallArrayPickler(stream, protocol=5, buffer_callback=callback).dump(obj)
            return stream.getvalue()
        self.busy = True
        self.callback = callback
        stream = self.stream
        try:
            self.pickler.dump(obj)
            return stream.getvalue()
        finally:
            stream.seek(0)
            stream.truncate()
            self.pickler.clear_memo()
            self.callback = None
            self.busy = False


class _SmallArrayPickler(pickle.Pickler):
    """Pickles small plain numpy arrays as (bytes, dtype, shape): half the cost of numpy's own reduce.

    Used only where the known segments are arenas (a request's body, a worker's outputs), whose small
    arrays may travel as copies; an array in a task's ``share_value`` segment travels by reference
    whatever its size, so it never takes this path. Large arrays fall through to the out-of-band path.
    """

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray and obj.nbytes < SHM_THRESHOLD and obj.dtype.isbuiltin and obj.flags.c_contiguous:
            return _small_array, (obj.tobytes(), obj.dtype.str, obj.shape)
        return NotImplemented


_plain = _PlainEncoder()


def _small_array(data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def decode(data: bytes, refs: list[BufferRef], segments: dict[str, Segment], final: bool = False) -> Any:
    """Unpickle what ``encode`` made, mapping the referenced segments (kept in ``segments``).

    ``final``: this is the task's answer, read by its caller: what lies in output arenas is copied
    out and its blocks freed (the worker reuses them); everything else stays a view of shared memory.
    """
    if not refs:
        return pickle.loads(data)
    buffers: list[memoryview | bytearray] = []
    done: set[tuple[str, int]] = set()
    for name, size, offset, nbytes in refs:
        seg = segments.get(name)
        if seg is None:
            seg = open_cached(name, size)
            segments[name] = seg
        view = seg.view(offset, nbytes)
        if final and name.endswith(OUTPUT_ARENA_SUFFIX):
            buffers.append(bytearray(view))
            done.add((name, offset))
        else:
            buffers.append(view)
    for name, offset in done:  # after every copy: the same block may be referenced twice
        free_output(segments[name], offset)
    return pickle.loads(data, buffers=buffers)


def output_blocks(refs: list[BufferRef]) -> set[tuple[str, int, int]]:
    """The output-arena blocks ``refs`` point into: ``(arena name, arena size, offset)``."""
    return {(name, size, offset) for name, size, offset, _ in refs if name.endswith(OUTPUT_ARENA_SUFFIX)}


def free_outputs(blocks: set[tuple[str, int, int]]) -> None:
    """Free output-arena blocks nobody will read (their arena may be gone with its worker)."""
    for name, size, offset in blocks:
        try:
            free_output(open_cached(name, size), offset)
        except FileNotFoundError:
            pass


class OutOfBandBytes:
    """Wraps a large ``bytes`` value so that pickle sends it out of band (``bytes`` never is by itself)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[type[bytes], tuple[pickle.PickleBuffer]]:
        return bytes, (pickle.PickleBuffer(self.data),)

"""Client processes for test_remote.py: each runs tasks through a ``RemoteFlow`` and reports back."""

from __future__ import annotations

import asyncio
import os
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from aqueduct.remote import ClientAddress, RemoteFlow

from .handlers import Task


def run_tasks(address: ClientAddress, values: list[Any], out: Connection, timeout: float = 10.0) -> None:
    """Send every value as a Task at once; report [(value, batch, outcome)] and the client's pid."""

    async def main() -> list[tuple[Any, int, str]]:
        remote = RemoteFlow(address)
        await remote.connect()

        async def one(value: Any) -> tuple[Any, int, str]:
            task = Task(value)
            try:
                await remote.process(task, timeout_sec=timeout)
            except Exception as exc:  # noqa: BLE001 - reported to the test
                return value, 0, type(exc).__name__
            return task.result, task.batch, "ok"

        try:
            return list(await asyncio.gather(*(one(v) for v in values)))
        finally:
            remote.close()

    out.send((os.getpid(), asyncio.run(main())))


def run_leased_arrays(address: ClientAddress, count: int, out: Connection) -> None:
    """Send ``count`` 256 KiB arrays at once, written into the client's 4 MiB arena while it has room and
    into plain memory after that; report, per array, whether it was leased and came back doubled."""

    async def main() -> list[tuple[bool, bool]]:
        remote = RemoteFlow(address, arena_bytes=4 << 20)
        await remote.connect()

        async def one(i: int) -> tuple[bool, bool]:
            lease = remote.lease(256 * 1024)
            array = np.frombuffer(lease.buffer, dtype=np.uint8) if lease else np.empty(256 * 1024, np.uint8)
            array[:] = i % 100
            task = Task(array)
            try:
                await remote.process(task, timeout_sec=20)
                return lease is not None, bool(np.array_equal(task.result, np.full_like(array, (i % 100) * 2)))
            finally:
                if lease:
                    lease.free()

        try:
            first = list(await asyncio.gather(*(one(i) for i in range(count))))
            return first + [await one(i) for i in range(count)]  # one at a time: every one fits
        finally:
            remote.close()

    out.send(asyncio.run(main()))


def hold_tasks(address: ClientAddress, count: int) -> None:
    """Submit tasks and wait forever (the test kills this process)."""

    async def main() -> None:
        remote = RemoteFlow(address)
        await remote.connect()
        await asyncio.gather(*(remote.process(Task(i), timeout_sec=60) for i in range(count)), return_exceptions=True)

    asyncio.run(main())

"""What the HTTP app needs of a flow, whether it runs in this process or in the pod's main process.

``LocalBackend``: the flow runs here (``server.workers: 1``): the app starts and stops it.
``RemoteBackend``: this is one of several front-end processes; the flow runs in the pod's main
process, reached through ``aqueduct.remote``. Either way large request bodies are read straight
into a shared-memory arena (the flow's, or the front end's), so their tensors reach the workers
without another copy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest

from aqueduct import BaseTask, Flow, FlowHealth
from aqueduct.remote import Lease, RemoteFlow

from .health import ServingState

log = logging.getLogger("aqueduct_service")


class FlowBackend(Protocol):
    """The flow as the app sees it."""

    #: Registry the app registers its HTTP metrics in.
    http_registry: CollectorRegistry

    async def start(self, state: ServingState) -> None:
        """Get the flow going (in the background: liveness answers meanwhile)."""

    async def stop(self) -> None:
        """Let requests in flight finish, then let go of the flow."""

    async def process(self, task: BaseTask, timeout_sec: float, leases: Sequence[Lease] = ()) -> bool:
        """``Flow.process``; ``leases`` (from ``lease()``) are held until no worker can use them."""

    async def health(self) -> FlowHealth:
        """``Flow.health``."""

    async def metrics(self) -> bytes:
        """Every metric of the pod, Prometheus text format."""

    def lease(self, nbytes: int) -> Lease | None:
        """Shared memory to read a request body into, or None (then plain memory is used)."""


class LocalBackend:
    """The flow, run in this process."""

    def __init__(self, flow: Flow, start_timeout: float | None, graceful_timeout: float) -> None:
        self.flow = flow
        self.http_registry = flow.metrics_registry
        self._start_timeout = start_timeout
        self._graceful_timeout = graceful_timeout
        self._starter: asyncio.Task[None] | None = None

    async def start(self, state: ServingState) -> None:
        async def start_flow() -> None:
            try:
                await self.flow.start_async(timeout=self._start_timeout)
            except Exception as e:
                log.exception("the flow failed to start")
                state.start_error = e

        self._starter = asyncio.create_task(start_flow())

    async def stop(self) -> None:
        if self._starter is not None:
            if not self._starter.done():
                self._starter.cancel()
            await asyncio.gather(self._starter, return_exceptions=True)
        await self.flow.stop(graceful=True, timeout=self._graceful_timeout)

    async def process(self, task: BaseTask, timeout_sec: float, leases: Sequence[Lease] = ()) -> bool:
        return await self.flow.process(task, timeout_sec=timeout_sec, leases=leases)

    async def health(self) -> FlowHealth:
        return self.flow.health()

    async def metrics(self) -> bytes:
        return generate_latest(self.flow.metrics_registry)

    def lease(self, nbytes: int) -> Lease | None:
        return self.flow.lease(nbytes)


class RemoteBackend:
    """The flow of the pod's main process, used from a front-end process."""

    def __init__(self, remote: RemoteFlow) -> None:
        self.remote = remote
        # HTTP metrics go to prometheus_client's multiprocess files; the main process collects them.
        self.http_registry = CollectorRegistry()

    async def start(self, state: ServingState) -> None:
        await self.remote.connect()

    async def stop(self) -> None:
        self.remote.close()

    async def process(self, task: BaseTask, timeout_sec: float, leases: Sequence[Lease] = ()) -> bool:
        return await self.remote.process(task, timeout_sec=timeout_sec, leases=leases)

    async def health(self) -> FlowHealth:
        return await self.remote.health()

    async def metrics(self) -> bytes:
        return await self.remote.metrics()

    def lease(self, nbytes: int) -> Lease | None:
        return self.remote.lease(nbytes)

"""uvicorn, configured and made to drain for Kubernetes; used by the pod's one or many HTTP processes."""

from __future__ import annotations

import signal
import socket
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from .connections import ConnectionLimits, guarded_protocol, raise_open_files_limit
from .health import ServingState
from .settings import Settings


def uvicorn_config(app: Starlette, settings: Settings, host: str, port: int) -> uvicorn.Config:
    """The uvicorn settings every HTTP process of the pod runs with."""
    server = settings.server
    limits = ConnectionLimits(
        server.max_header_bytes, server.header_timeout, server.body_timeout, server.max_connections
    )
    raise_open_files_limit()  # connections are files: let max_connections, not the soft limit, be the bound
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=guarded_protocol(limits),
        timeout_keep_alive=server.keepalive_timeout,
        lifespan="on",
        access_log=False,  # the app's own (logs.AccessLog): sampled, with the request id
        proxy_headers=False,  # the access log has no client addresses
        log_config=None,  # uvicorn's records go through the pod's one handler (logs.configure_logging)
        log_level=server.log_level,
        timeout_graceful_shutdown=int(server.graceful_timeout),
        backlog=2048,
    )


class ServingServer(uvicorn.Server):
    """uvicorn's server, made to drain for Kubernetes.

    On SIGTERM/SIGINT the pod turns not-ready at once, then uvicorn stops accepting, finishes in-flight
    requests within ``timeout_graceful_shutdown`` and runs the lifespan shutdown (which stops the flow).
    Unlike plain uvicorn the signal is not re-raised afterwards, so a graceful stop exits 0. If the flow
    fails to start, the server stops too and ``main`` exits 1 (Kubernetes restarts the pod).
    """

    def __init__(self, config: uvicorn.Config, state: ServingState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.state.draining = True
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.state.start_error is not None:
            self.should_exit = True
        return await super().on_tick(counter)


def serve(config: uvicorn.Config, state: ServingState, sock: socket.socket | None = None) -> None:
    """Run the server until it is told to stop; on ``sock`` when given (shared by several processes)."""
    ServingServer(config, state).run(sockets=[sock] if sock is not None else None)

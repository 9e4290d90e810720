"""One HTTP front-end process of a multi-process pod (``server.workers`` > 1).

It serves HTTP on a socket the main process bound for it (one port for all), decodes requests,
reads large bodies into its shared-memory arena and sends the tasks to the main process's flow
through ``aqueduct.remote``. It exits when told to (SIGTERM: drain, then exit 0) or when the main
process goes away (its channel closes).
"""

from __future__ import annotations

import gc
import logging
import socket

from aqueduct.remote import ClientAddress, RemoteFlow

from .app import create_app
from .backend import RemoteBackend
from .health import ServingState
from .server import ServingServer, uvicorn_config
from .settings import Settings

log = logging.getLogger("aqueduct_service")


def frontend_main(settings: Settings, address: ClientAddress, sock: socket.socket, index: int) -> None:
    """Entry point of a front-end process (started with the ``spawn`` method by ``pod.run_pod``)."""
    logging.basicConfig(
        level=settings.server.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s[frontend {index}]: %(message)s",
    )
    state = ServingState()
    server: ServingServer | None = None

    def main_process_gone() -> None:
        log.error("the pod's main process closed the channel; exiting")
        state.draining = True
        if server is not None:
            server.should_exit = True

    remote = RemoteFlow(address, arena_bytes=settings.server.arena_bytes, on_disconnect=main_process_gone)
    app = create_app(RemoteBackend(remote), settings, state)
    host, port = sock.getsockname()[:2]
    server = ServingServer(uvicorn_config(app, settings, host, port), state)
    gc.collect()
    gc.freeze()
    server.run(sockets=[sock])

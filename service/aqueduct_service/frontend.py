"""One HTTP front-end process of a multi-process pod (``server.workers`` > 1).

It serves HTTP on a socket the main process bound for it (one port for all), decodes requests,
reads large bodies into its shared-memory arena and sends the tasks to the main process's flow
through ``aqueduct.remote``. It exits when told to (SIGTERM: drain, then exit 0) or when the main
process goes away (its channel closes).
"""

from __future__ import annotations

import argparse
import gc
import logging
import socket
import sys
from collections.abc import Sequence

from aqueduct.remote import ClientAddress, RemoteFlow

from .app import create_app
from .backend import RemoteBackend
from .health import ServingState
from .logs import configure_logging
from .server import ServingServer, uvicorn_config
from .settings import Settings, load_settings, with_host, with_signature

log = logging.getLogger("aqueduct_service")


def serve_frontend(settings: Settings, address: ClientAddress, sock: socket.socket, index: int) -> None:
    """Serve HTTP on ``sock`` for the flow behind ``address`` until told to stop."""
    configure_logging(settings.server.log_format, settings.server.log_level, settings.name, frontend=index)
    state = ServingState()
    server: ServingServer | None = None

    def main_process_gone() -> None:
        log.error("the pod's main process closed the channel; exiting")
        state.draining = True
        if server is not None:
            server.should_exit = True

    host, port = sock.getsockname()[:2]
    settings = with_host(settings, host)  # gRPC binds the same address as HTTP
    remote = RemoteFlow(address, arena_bytes=settings.server.arena_bytes, on_disconnect=main_process_gone)
    app = create_app(RemoteBackend(remote), settings, state)
    server = ServingServer(uvicorn_config(app, settings, host, port), state)
    gc.collect()
    gc.freeze()
    server.run(sockets=[sock])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aqueduct_service.frontend``: how ``pod.Pod`` starts a front end (not for users)."""
    parser = argparse.ArgumentParser(prog="aqueduct-serve frontend")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listen-fd", type=int, required=True, help="the listening socket, inherited")
    parser.add_argument("--channel-fd", type=int, required=True, help="the channel to the flow, inherited")
    parser.add_argument("--prefix", required=True, help="the channel's shared-memory prefix")
    parser.add_argument("--signature", required=True, help="the pod's tensors as the main process resolved them")
    args = parser.parse_args(argv)
    # the main process checked the config already, and read the runtime steps' models for the tensors
    settings = with_signature(load_settings(args.config), args.signature)
    sock = socket.socket(fileno=args.listen_fd)
    address = ClientAddress(socket.socket(fileno=args.channel_fd), args.prefix)
    serve_frontend(settings, address, sock, args.index)
    return 0


if __name__ == "__main__":
    sys.exit(main())

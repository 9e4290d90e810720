"""``aqueduct-serve --config pipeline.yaml``: validate the config, build the flow, serve it with uvicorn."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

import uvicorn

from .app import create_app
from .health import ServingState
from .pipeline import build_flow
from .settings import ConfigError, load_settings

log = logging.getLogger("aqueduct_service")


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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="aqueduct-serve",
        description="Serve one aqueduct flow over HTTP (Open Inference Protocol v2). "
        "Environment variables AQUEDUCT_<KEY>[__<KEY>...] override single config values, "
        "e.g. AQUEDUCT_STEPS__DETECT__BATCH_SIZE=32.",
    )
    parser.add_argument("--config", required=True, help="pipeline YAML file (format: config.schema.json)")
    parser.add_argument("--host", help="bind address (overrides server.host)")
    parser.add_argument("--port", type=int, help="bind port (overrides server.port)")
    parser.add_argument(
        "--app-dir",
        default=".",
        help="directory put first on sys.path, so handlers 'package.module:Class' import from it (default: .)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the serving pod; returns the process exit code."""
    args = parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.app_dir))
    try:
        settings = load_settings(args.config)
        flow = build_flow(settings)
    except ConfigError as e:
        print(f"aqueduct-serve: {e}", file=sys.stderr)
        return 2
    server_settings = settings.server
    logging.basicConfig(
        level=server_settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    state = ServingState()
    config = uvicorn.Config(
        create_app(flow, settings, state),
        host=args.host or server_settings.host,
        port=server_settings.port if args.port is None else args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        proxy_headers=False,  # client addresses are only for access logs, which are off
        log_level=server_settings.log_level,
        timeout_graceful_shutdown=int(server_settings.graceful_timeout),
    )
    # Startup objects (modules, the app) are never garbage: keep full collections from scanning them.
    gc.collect()
    gc.freeze()
    ServingServer(config, state).run()
    if state.start_error is not None:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

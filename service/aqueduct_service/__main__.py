"""``aqueduct-serve --config pipeline.yaml``: validate the config, build the flow, serve it with uvicorn.

A bad config or model file is exit status 2, before the port is bound.

With ``server.workers: 1`` one process does HTTP and runs the flow; with more, ``pod.run_pod`` runs
the flow here and that many HTTP front-end processes beside it.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Sequence

from aqueduct import sweep_stale_segments

from .app import create_app
from .health import ServingState
from .logs import configure_logging
from .pipeline import build_flow, resolve_settings
from .pod import run_pod
from .server import ServingServer, uvicorn_config
from .settings import ConfigError, load_settings, with_host

log = logging.getLogger("aqueduct_service")


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
    sweep_stale_segments()  # what a killed container of this pod left in /dev/shm, before the flow makes its own
    sys.path.insert(0, os.path.abspath(args.app_dir))
    try:
        settings = load_settings(args.config)
        configure_logging(settings.server.log_format, settings.server.log_level, settings.name)
        flow = build_flow(settings)
        settings = resolve_settings(settings, flow)
    except ConfigError as e:
        print(f"aqueduct-serve: {e}", file=sys.stderr)
        return 2
    server_settings = settings.server
    host = args.host or server_settings.host
    settings = with_host(settings, host)  # gRPC binds the same address as HTTP
    port = server_settings.port if args.port is None else args.port
    # Startup objects (modules, the app) are never garbage: keep full collections from scanning them.
    gc.collect()
    gc.freeze()
    if server_settings.front_ends > 1:
        return run_pod(settings, args.config, flow, host, port)
    state = ServingState()
    ServingServer(uvicorn_config(create_app(flow, settings, state), settings, host, port), state).run()
    return 1 if state.start_error is not None else 0


if __name__ == "__main__":
    sys.exit(main())

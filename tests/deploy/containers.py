"""Containers for the image tests: run one as Kubernetes would, serve a config from it, ask it over HTTP.

Every container runs with ``--network host`` (the CI engine has no bridge), its server bound to 127.0.0.1
on a free port, a read-only root filesystem and a writable /tmp only; it is removed however the test ends.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from bench.processes import free_port

from .conftest import Docker, wait_until


def http(method: str, url: str, body: Any = None, timeout: float = 5) -> tuple[int, Any]:
    """One JSON request; returns (status, decoded body), the text of the body for an error status."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
            return response.status, json.loads(payload) if payload else None
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


@contextlib.contextmanager
def container(docker: Docker, image: str, *args: str, options: tuple[str, ...] = ()) -> Iterator[Callable[[], str]]:
    """docker run -d the image as Kubernetes would; yields a function returning its logs; always removed."""
    name = f"aqueduct-test-{uuid.uuid4().hex[:8]}"
    docker(
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--shm-size",
        "256m",
        *options,
        image,
        *args,
    )

    def logs() -> str:
        proc = docker("logs", "--tail", "80", name, check=False)
        return proc.stdout + proc.stderr

    try:
        yield logs
    finally:
        docker("rm", "-f", name, check=False)


@contextlib.contextmanager
def serving(
    docker: Docker, image: str, *command: str, options: tuple[str, ...] = (), ready_within: float = 90
) -> Iterator[tuple[str, Callable[[], str]]]:
    """Run ``command`` (the image's own CMD when empty) on a free loopback port until it is ready.

    Yields the server's base URL and the container's logs.
    """
    port = free_port()
    args = (*command, "--host", "127.0.0.1", "--port", str(port)) if command else ()
    # Without a command the image's CMD serves on the port its config says: tell it which through the environment.
    env = () if command else ("-e", "AQUEDUCT_SERVER__HOST=127.0.0.1", "-e", f"AQUEDUCT_SERVER__PORT={port}")
    base = f"http://127.0.0.1:{port}"
    with container(docker, image, *args, options=(*env, *options)) as logs:
        ready = f"{base}/v2/health/ready"
        wait_until(ready, lambda: http("GET", ready)[0] == 200, ready_within, logs=logs)
        yield base, logs

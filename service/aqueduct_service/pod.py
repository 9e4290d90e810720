"""The main process of a multi-process pod (``server.workers`` > 1).

It binds the port, runs the flow (whose workers are its children), and keeps ``server.workers``
HTTP front-end processes serving on that port (one ``SO_REUSEPORT`` socket each), each connected to the flow through a
``FlowGateway`` channel. A front end that dies is replaced (only its own requests in flight fail);
one that keeps dying at once is restarted with a growing delay. On SIGTERM or SIGINT every front
end drains (not ready, in-flight requests finish within ``graceful_timeout``) and exits, then the
flow stops and the process exits 0. See ``docs/FRONTENDS.md``.

Metrics: the front ends write their HTTP metrics to prometheus_client's multiprocess files; this
process serves them, summed, together with the flow's, to whichever front end ``/metrics`` reaches.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import uvloop
from prometheus_client import multiprocess

from aqueduct import Flow
from aqueduct.remote import FlowGateway

from .settings import Settings, signature_json

log = logging.getLogger("aqueduct_service")

#: A front end that exits sooner than this after its start counts as crash-looping.
_CRASH_WINDOW_S = 5.0
_MAX_RESTART_DELAY_S = 30.0
_KILL_MARGIN_S = 5.0


@dataclass
class _FrontEnd:
    process: subprocess.Popen[bytes]
    pidfd: int  # readable once the process has exited
    started_at: float


class Pod:
    """Runs the flow and supervises the front ends (see the module docstring)."""

    def __init__(
        self, settings: Settings, config_path: str, flow: Flow, sockets: list[socket.socket], metrics_dir: str
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.flow = flow
        self.sockets = sockets
        self.metrics_dir = metrics_dir
        self.count = len(sockets)
        self.frontends: list[_FrontEnd | None] = [None] * self.count
        self.crashes = [0] * self.count
        self.stopping = False
        self._gateway: FlowGateway | None = None
        self._all_exited = asyncio.Event()
        # this process's import path (with --app-dir): a front end unpickles what the handlers set
        self._frontend_env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        }

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code (1: the flow failed to start)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        multiprocess.MultiProcessCollector(self.flow.metrics_registry, path=self.metrics_dir)  # type: ignore[no-untyped-call]
        self._gateway = FlowGateway(self.flow)
        for index in range(self.count):
            self._start_frontend(index)
        log.info("serving on %s with %d front-end processes", self.sockets[0].getsockname(), self.count)
        starter = asyncio.create_task(self.flow.start_async(timeout=self.settings.start_timeout))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({starter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if starter.done() and starter.exception() is not None:
            log.error("the flow failed to start", exc_info=starter.exception())
            code = 1
        elif not starter.done():
            starter.cancel()
            await asyncio.gather(starter, return_exceptions=True)
        else:
            await stopper
        stopper.cancel()
        await self._stop_frontends()
        self._gateway.close()
        await self.flow.stop(graceful=True, timeout=self.settings.server.graceful_timeout)
        return code

    def _start_frontend(self, index: int) -> None:
        if self.stopping:
            return
        assert self._gateway is not None
        address = self._gateway.connect()
        listen_fd, channel_fd = self.sockets[index].fileno(), address.sock.fileno()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "aqueduct_service.frontend", "--config", self.config_path]
                + ["--index", str(index), "--listen-fd", str(listen_fd), "--channel-fd", str(channel_fd)]
                + ["--prefix", address.prefix, "--signature", signature_json(self.settings)],
                pass_fds=(listen_fd, channel_fd),
                env={
                    **os.environ,
                    "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir,
                    "PYTHONPATH": os.pathsep.join(sys.path),
                },
            )
        finally:
            address.close()
        pidfd = os.pidfd_open(process.pid)
        self.frontends[index] = _FrontEnd(process, pidfd, time.monotonic())
        asyncio.get_running_loop().add_reader(pidfd, self._on_exit, index)

    def _on_exit(self, index: int) -> None:
        frontend = self.frontends[index]
        assert frontend is not None
        loop = asyncio.get_running_loop()
        loop.remove_reader(frontend.pidfd)
        os.close(frontend.pidfd)
        process = frontend.process
        code = process.wait()
        self.frontends[index] = None
        multiprocess.mark_process_dead(process.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
        if self.stopping:
            if not any(self.frontends):
                self._all_exited.set()
            return
        quick = time.monotonic() - frontend.started_at < _CRASH_WINDOW_S
        self.crashes[index] = self.crashes[index] + 1 if quick else 0
        delay = 0.0 if not self.crashes[index] else min(_MAX_RESTART_DELAY_S, 0.5 * 2 ** (self.crashes[index] - 1))
        log.error(
            "front end %d (pid %d) exited with code %s; starting a new one in %.1f s", index, process.pid, code, delay
        )
        loop.call_later(delay, self._start_frontend, index)

    async def _stop_frontends(self) -> None:
        """SIGTERM every front end and wait for them to drain; SIGKILL any still there after the bound."""
        self.stopping = True
        live = [f.process for f in self.frontends if f is not None]
        if not live:
            return
        for process in live:
            _signal(process.pid, signal.SIGTERM)
        bound = self.settings.server.graceful_timeout + _KILL_MARGIN_S
        try:
            await asyncio.wait_for(self._all_exited.wait(), bound)
        except asyncio.TimeoutError:
            for process in live:
                if process.poll() is None:
                    log.error("front end pid %d did not drain within %.0f s; killing it", process.pid, bound)
                    _signal(process.pid, signal.SIGKILL)
                    process.wait(5)


def run_pod(settings: Settings, config_path: str, flow: Flow, host: str, port: int) -> int:
    """Bind ``host:port`` and serve ``flow`` with ``settings.server.front_ends`` front ends; the exit code.

    The front ends read their settings from ``config_path`` (and the environment), as this process did,
    and get the tensors this process read from the runtime steps' models (``settings``) on their command line.
    """
    sockets = listen(host, port, settings.server.front_ends)
    metrics_dir = tempfile.mkdtemp(prefix="aqueduct-metrics-")  # the front ends' prometheus_client files
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(Pod(settings, config_path, flow, sockets, metrics_dir).run())
    finally:
        loop.close()
        for sock in sockets:
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def listen(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one port (``SO_REUSEPORT``): one per front end.

    The kernel spreads new connections evenly over them, where one shared socket would let
    whichever process wakes first take most of them. This process keeps every socket open, so the
    connections that reach a dead front end's socket wait in its backlog for the replacement.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]  # port 0: the others join the port the first one got
            sock.listen(2048)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass

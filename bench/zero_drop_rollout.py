#!/usr/bin/env python3
"""Zero-drop rolling update: two serving pods behind a round-robin proxy, one replaced at a time, under load.

What plays Kubernetes' part, on loopback:

- **pods**: real ``aqueduct-serve --config examples/noop/pipeline.yaml`` processes;
- **endpoints**: a pod is an endpoint while its readiness probe (``/v2/health/ready``) passes and it is not
  terminating, as in a Service's EndpointSlice; the proxy learns each change ``--sync-delay`` seconds late,
  as kube-proxy (or an ingress) does;
- **proxy**: round robin over the endpoints it knows, one upstream connection per request, no retries
  (a request that reaches a pod that no longer listens fails);
- **rollout**: what the Deployment controller and the kubelet do with the operator's rendered Deployment
  (``maxSurge: 1``, ``maxUnavailable: 0``): start a new pod, wait until it is an endpoint the proxy
  knows, then terminate an old one: take it out of the endpoints, run its ``preStop`` hook (the
  rendered ``sleep``, ``spec.server.drainDelay`` seconds), SIGTERM it, SIGKILL it after
  ``terminationGracePeriodSeconds``; repeat until every pod is new.

A load loop (``--concurrency`` clients, closed loop) runs from before the first replacement to after the
last. Prints requests, failures by cause, requests/s and latency, with the pause as rendered and, for
comparison, without it (``drainDelay: 0``; skip with ``--no-baseline``).

    .venv/bin/python bench/zero_drop_rollout.py [--drain 5] [--sync-delay 1] [--concurrency 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import yaml
from aqueduct_operator.render import desired_objects

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.processes import free_port  # noqa: E402

SERVE = Path(sys.executable).with_name("aqueduct-serve")
CONFIG = ROOT / "examples" / "noop" / "pipeline.yaml"
PIPELINE = ROOT / "examples" / "pipelines" / "noop.yaml"
MODEL = "noop"
BODY = {"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]}
PROBE_PERIOD = 0.1
START_BOUND = 60.0


@dataclass(frozen=True)
class PodTemplate:
    """What the rollout takes from the operator's Deployment for the noop Pipeline."""

    pre_stop: list[str]
    grace_seconds: int
    max_surge: int
    max_unavailable: int

    @classmethod
    def rendered(cls, drain: float | None) -> PodTemplate:
        body = yaml.safe_load(PIPELINE.read_text())
        body["metadata"].update(namespace="default", uid="00000000-0000-4000-8000-000000000000", generation=1)
        if drain is not None:
            body["spec"].setdefault("server", {})["drainDelay"] = drain
        deployment = next(o for o in desired_objects(body) if o["kind"] == "Deployment")
        pod = deployment["spec"]["template"]["spec"]
        hook = pod["containers"][0].get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        rolling = deployment["spec"]["strategy"]["rollingUpdate"]
        return cls(
            list(hook), int(pod["terminationGracePeriodSeconds"]), rolling["maxSurge"], rolling["maxUnavailable"]
        )


class Pod:
    """One ``aqueduct-serve`` process on a loopback port, in a session of its own."""

    def __init__(self, name: str, logs: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.terminating = False
        self.log = logs / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                str(SERVE),
                "--config",
                str(CONFIG),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                cwd=ROOT,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )

    async def ready(self, session: aiohttp.ClientSession) -> bool:
        try:
            async with session.get(f"{self.url}/v2/health/ready", timeout=aiohttp.ClientTimeout(total=1)) as reply:
                return reply.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def terminate(self, template: PodTemplate) -> dict[str, Any]:
        """The kubelet's part: preStop hook, SIGTERM, SIGKILL after the grace period. Returns timings."""
        assert self.proc is not None
        started = time.monotonic()
        self.terminating = True  # the endpoints controller drops a terminating pod at once
        if template.pre_stop:
            hook = await asyncio.create_subprocess_exec(*template.pre_stop)
            await hook.wait()
        stopped = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), template.grace_seconds - (stopped - started))
        except asyncio.TimeoutError:
            self.kill()
            code = await self.proc.wait()
        return {
            "pod": self.name,
            "pre_stop_s": round(stopped - started, 2),
            "sigterm_to_exit_s": round(time.monotonic() - stopped, 2),
            "exit_code": code,
        }

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


class Endpoints:
    """A Service's endpoints (ready, not terminating pods), as a proxy sees them ``sync_delay`` seconds late."""

    def __init__(self, sync_delay: float) -> None:
        self.sync_delay = sync_delay
        self.pods: list[Pod] = []
        self._ready: set[str] = set()
        self._history: collections.deque[tuple[float, tuple[Pod, ...]]] = collections.deque()
        self.view: tuple[Pod, ...] = ()

    async def run(self, session: aiohttp.ClientSession) -> None:
        while True:
            for pod in list(self.pods):
                if await pod.ready(session):
                    self._ready.add(pod.name)
                else:
                    self._ready.discard(pod.name)
            now = time.monotonic()
            truth = tuple(p for p in self.pods if p.name in self._ready and not p.terminating)
            self._history.append((now, truth))
            while len(self._history) > 1 and self._history[1][0] <= now - self.sync_delay:
                self._history.popleft()
            if self._history[0][0] <= now - self.sync_delay:
                self.view = self._history[0][1]
            await asyncio.sleep(PROBE_PERIOD)


class Proxy:
    """Round robin over the endpoints the proxy knows; one upstream connection per request; no retries."""

    def __init__(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        self.turn = 0
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        view = self.endpoints.view
        if not view:
            return aiohttp.web.Response(status=503, text="no endpoints")
        pod = view[self.turn % len(view)]
        self.turn += 1
        body = await request.read()
        assert self.session is not None
        try:
            async with self.session.post(
                f"{pod.url}{request.path}", data=body, headers={"Content-Type": "application/json"}
            ) as reply:
                return aiohttp.web.Response(status=reply.status, body=await reply.read(), headers={"X-Pod": pod.name})
        except aiohttp.ClientError as e:
            return aiohttp.web.Response(status=502, text=f"{pod.name}: {type(e).__name__}")

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30))
        app = aiohttp.web.Application()
        app.router.add_post("/v2/models/{name}/infer", self.handle)
        runner = aiohttp.web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        site = aiohttp.web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()
            await self.session.close()


@dataclass
class Load:
    """Closed-loop clients through the proxy: every answer's status and latency."""

    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)

    async def client(self, url: str, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    async with session.post(f"{url}/v2/models/{MODEL}/infer", json=BODY) as reply:
                        await reply.read()
                        self.statuses[str(reply.status)] += 1
                except aiohttp.ClientError as e:
                    self.statuses[type(e).__name__] += 1
                self.latencies.append(time.perf_counter() - started)


async def wait(what: str, predicate: Any, bound: float) -> None:
    deadline = time.monotonic() + bound
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {bound} s")
        await asyncio.sleep(0.05)


async def rollout(args: argparse.Namespace, drain: float | None, logs: Path) -> dict[str, Any]:
    """One rolling update of ``--pods`` pods under load; the figures."""
    template = PodTemplate.rendered(drain)
    assert (template.max_surge, template.max_unavailable) == (1, 0), "the operator's rolling update changed"
    endpoints = Endpoints(args.sync_delay)
    load, stop = Load(), asyncio.Event()
    serial = iter(range(1000))
    async with aiohttp.ClientSession() as probes, Proxy(endpoints).serving() as url:
        prober = asyncio.create_task(endpoints.run(probes))
        try:
            for _ in range(args.pods):
                pod = Pod(f"old-{next(serial)}", logs)
                endpoints.pods.append(pod)
                await pod.start()
            old = list(endpoints.pods)
            await wait("the old pods as endpoints", lambda: len(endpoints.view) == args.pods, START_BOUND)
            clients = [asyncio.create_task(load.client(url, stop)) for _ in range(args.concurrency)]
            await asyncio.sleep(args.settle)
            started = time.monotonic()
            replaced = []
            for victim in old:
                new = Pod(f"new-{next(serial)}", logs)
                endpoints.pods.append(new)
                await new.start()
                await wait(f"{new.name} as an endpoint", lambda n=new: n in endpoints.view, START_BOUND)
                replaced.append(await victim.terminate(template))
                endpoints.pods.remove(victim)
            seconds = time.monotonic() - started
            await asyncio.sleep(args.settle)
            stop.set()
            await asyncio.gather(*clients)
        finally:
            stop.set()
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober
            for pod in endpoints.pods:
                with contextlib.suppress(ProcessLookupError):
                    if pod.proc is not None and pod.proc.returncode is None:
                        pod.proc.send_signal(signal.SIGTERM)
            for pod in endpoints.pods:
                if pod.proc is not None:
                    try:
                        await asyncio.wait_for(pod.proc.wait(), 30)
                    except asyncio.TimeoutError:
                        pod.kill()
                        await pod.proc.wait()
    total = sum(load.statuses.values())
    failed = total - load.statuses["200"]
    latencies = sorted(load.latencies)
    return {
        "pre_stop": " ".join(template.pre_stop) or "(none)",
        "pods_replaced": len(replaced),
        "rollout_s": round(seconds, 2),
        "requests": total,
        "failed": failed,
        "statuses": dict(load.statuses),
        "requests_per_s": round(total / (seconds + 2 * args.settle), 1),
        "latency_p50_ms": round(statistics.median(latencies) * 1000, 2),
        "latency_p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1000, 2),
        "latency_max_ms": round(latencies[-1] * 1000, 2),
        "terminations": replaced,
    }


def report(name: str, result: dict[str, Any]) -> None:
    print(f"== {name}: preStop {result['pre_stop']}")
    print(
        f"   {result['pods_replaced']} pods replaced in {result['rollout_s']} s; {result['requests']} requests "
        f"({result['requests_per_s']}/s), failed {result['failed']} {result['statuses']}"
    )
    print(
        f"   latency p50 {result['latency_p50_ms']} ms, p99 {result['latency_p99_ms']} ms, "
        f"max {result['latency_max_ms']} ms"
    )
    for t in result["terminations"]:
        print(
            f"   {t['pod']}: preStop {t['pre_stop_s']} s, SIGTERM to exit {t['sigterm_to_exit_s']} s, "
            f"exit code {t['exit_code']}"
        )


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    # SIGTERM cancels the run, so that every pod it started is stopped on the way out.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("json", "logs")}}
    results["with_pause"] = await rollout(args, args.drain, logs)
    report("rolling update as rendered (preStop pause, then SIGTERM)", results["with_pause"])
    if args.baseline:
        results["without_pause"] = await rollout(args, 0, logs)
        report("baseline: drainDelay 0 (SIGTERM as the pod leaves the endpoints)", results["without_pause"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=2, help="replicas (default 2)")
    parser.add_argument("--drain", type=float, help="spec.server.drainDelay, s (default: the CRD's, 5)")
    parser.add_argument("--sync-delay", type=float, default=1.0, help="endpoint propagation to the proxy, s")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    parser.add_argument("--settle", type=float, default=1.0, help="load before and after the rollout, s")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the drainDelay 0 run")
    parser.add_argument("--logs", default="/tmp/aqueduct-rollout-bench", help="directory for the pods' logs")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

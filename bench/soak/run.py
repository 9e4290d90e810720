"""Soak: the serving pod under poisoned inputs and killed workers, on loopback, bounded in time and count.

It starts the pod (``bench/soak/model.py``: ``y = 2x``; 2 workers, batch 16, 2 ms window), sends
``--requests`` requests with ``--concurrency`` in flight, of which ``--raising`` raise in the handler
and ``--crashing`` kill their worker (``os.abort()``), and, with ``--kill-every``, SIGKILLs a random
worker at that period. It runs once without and once with the kills and prints, for each: good
requests answered right, poisoned requests answered with an error naming their cause, timeouts,
throughput, how long after the last kill the pod was ready again, the exit code on SIGTERM, and
processes or /dev/shm segments left behind.

    .venv/bin/python bench/soak/run.py --requests 10000 --raising 0.01 --crashing 0.01 --kill-every 1

``--elements 10000`` makes each ``x`` 80 KB sent as a binary tensor: it is read into shared memory
and its batches travel to the workers by reference, through the same crash bisection.
``--timing-out 0.02`` makes that fraction of requests give up after 1 ms while their batch takes 20 ms:
they are answered 504 while a worker still holds them, and the model doubles ``x`` in place, so a
request body's shared memory handed to another request too early shows as a wrong good answer.
``--grpc`` sends the requests over gRPC (tritonclient's asyncio client, raw contents) instead; the
codes count as HTTP's statuses (INTERNAL 500, UNAVAILABLE 503, DEADLINE_EXCEEDED 504).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc.aio as grpcclient
import yaml
from tritonclient.utils import InferenceServerException

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from bench.processes import free_port, group_pids  # noqa: E402

RAISE, CRASH = -1, -2


@dataclass
class Outcome:
    label: str
    good: int = 0
    good_right: int = 0
    good_errors: dict[str, int] = field(default_factory=dict)
    raising: int = 0
    raising_named: int = 0
    crashing: int = 0
    crashing_named: int = 0
    timing_out: int = 0
    timing_out_504: int = 0
    timeouts: int = 0
    seconds: float = 0.0
    kills: int = 0
    ready_after_last_kill_s: float | None = None
    exit_code: int | None = None
    leftover_processes: list[int] = field(default_factory=list)
    leftover_segments: list[str] = field(default_factory=list)

    def report(self) -> str:
        rate = self.requests / self.seconds
        right = 100 * self.good_right / max(1, self.good)
        lines = [
            f"## {self.label}",
            f"- good requests answered right: {self.good_right}/{self.good} ({right:.2f}%); "
            f"the others: {self.good_errors or 'none'}",
            f"- raising requests answered 500 naming ValueError: {self.raising_named}/{self.raising}",
            f"- crashing requests answered 5xx naming WorkerDiedError: {self.crashing_named}/{self.crashing}",
            f"- requests timing out in their worker answered 504: {self.timing_out_504}/{self.timing_out}",
            f"- other timeouts or hangs: {self.timeouts}",
            f"- throughput: {rate:.0f} req/s over {self.seconds:.1f} s",
            f"- workers killed from outside: {self.kills}",
        ]
        if self.ready_after_last_kill_s is not None:
            lines.append(f"- ready again {self.ready_after_last_kill_s:.2f} s after the last kill")
        lines += [
            f"- SIGTERM exit code: {self.exit_code}",
            f"- processes left: {self.leftover_processes or 'none'}; /dev/shm segments left: "
            f"{self.leftover_segments or 'none'}",
        ]
        return "\n".join(lines)

    @property
    def requests(self) -> int:
        return self.good + self.raising + self.crashing + self.timing_out


def config(args: argparse.Namespace, grpc_port: int) -> dict[str, object]:
    return {
        "version": 1,
        "name": "soak",
        "steps": [
            {
                "name": "double",
                "handler": "bench.soak.model:SoakHandler",
                "nprocs": args.nprocs,
                "batch_size": args.batch_size,
                "batch_timeout": 0.002,
            }
        ],
        "queue_size": 4096,
        "timeout": args.timeout,
        "server": {"log_level": "critical", "workers": args.frontends, "grpc_port": grpc_port},
    }


async def soak(args: argparse.Namespace, kill_every: float, label: str) -> Outcome:
    outcome = Outcome(label)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "soak.yaml"
        port, grpc_port = free_port(), free_port() if args.grpc else 0
        path.write_text(yaml.safe_dump(config(args, grpc_port)))
        env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'service'}")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "aqueduct_service",
                "--config",
                str(path),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=args.timeout + 20, limits=limits
        ) as client:
            await wait_ready(client, proc, 120)
            rng = random.Random(args.seed)
            bounds = [
                ("crash", args.crashing),
                ("raise", args.crashing + args.raising),
                ("timeout", args.crashing + args.raising + args.timing_out),
            ]
            kinds = [
                next((kind for kind, bound in bounds if r < bound), "good")
                for r in (rng.random() for _ in range(args.requests))
            ]
            queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
            for item in enumerate(kinds):
                queue.put_nowait(item)
            done = asyncio.Event()
            last_kill = [0.0]
            killer = (
                asyncio.create_task(kill_workers(client, kill_every, done, outcome, last_kill, rng))
                if kill_every
                else None
            )
            started = time.perf_counter()
            grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") if args.grpc else None
            if grpc is not None:
                send = functools.partial(grpc_call, grpc, args.elements, args.timeout + 20)
            else:
                send = functools.partial(http_call, client, args.elements)
            try:
                await asyncio.gather(*(client_loop(send, queue, outcome) for _ in range(args.concurrency)))
            finally:
                if grpc is not None:
                    await grpc.close()
            outcome.seconds = time.perf_counter() - started
            done.set()
            if killer is not None:
                await killer
                outcome.ready_after_last_kill_s = await ready_after(client, last_kill[0])
        os.kill(proc.pid, signal.SIGTERM)
        try:
            outcome.exit_code = proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        time.sleep(0.5)
        outcome.leftover_processes = group_pids(proc.pid)
        outcome.leftover_segments = sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"aqd-{proc.pid}-"))
        if outcome.leftover_processes:
            os.killpg(proc.pid, signal.SIGKILL)
    return outcome


async def wait_ready(client: httpx.AsyncClient, proc: subprocess.Popen[bytes], bound: float) -> None:
    deadline = time.monotonic() + bound
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the pod exited with {proc.returncode}")
        try:
            if (await client.get("/v2/health/ready")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the pod did not become ready")
        await asyncio.sleep(0.05)


#: A timing-out request's OIP parameters: it gives up after 1 ms (in microseconds), its batch takes 20 ms.
TIMING_OUT = {"timeout": 1000, "sleep": 0.02}


def binary_request(x: int, elements: int, parameters: dict[str, float]) -> tuple[bytes, dict[str, str]]:
    """A request whose ``x`` is ``elements`` int64s of value ``x``, sent and answered as binary tensors."""
    data = np.full(elements, x, dtype=np.int64).tobytes()
    tensor = {"name": "x", "shape": [elements], "datatype": "INT64", "parameters": {"binary_data_size": len(data)}}
    outputs = [{"name": "y", "parameters": {"binary_data": True}}]
    header = json.dumps({"inputs": [tensor], "outputs": outputs, "parameters": parameters})
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    return header.encode() + data, headers


def answered_right(reply: httpx.Response, x: int, elements: int) -> bool:
    """Whether ``reply`` is a 200 whose ``y`` is ``2 * x`` in each of its ``elements``."""
    if reply.status_code != 200:
        return False
    if elements == 1:
        return bool(reply.json()["outputs"][0]["data"] == [2 * x])
    y = np.frombuffer(reply.content[int(reply.headers["inference-header-content-length"]) :], dtype=np.int64)
    return y.shape == (elements,) and bool((y == 2 * x).all())


#: A request's answer: its HTTP status (a gRPC code as its HTTP twin; 0: no answer), the error's text,
#: and whether it is a 200 whose ``y`` is ``2 * x``.
Answer = tuple[int, str, bool]
#: gRPC codes as the HTTP statuses the pod gives the same errors.
GRPC_STATUS = {"INVALID_ARGUMENT": 400, "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}


async def http_call(client: httpx.AsyncClient, elements: int, x: int, parameters: dict[str, float]) -> Answer:
    if elements == 1:
        tensor = {"name": "x", "shape": [1], "datatype": "INT64", "data": [x]}
        reply = await client.post("/v2/models/soak/infer", json={"inputs": [tensor], "parameters": parameters})
    else:
        content, headers = binary_request(x, elements, parameters)
        reply = await client.post("/v2/models/soak/infer", content=content, headers=headers)
    status = reply.status_code
    return status, reply.text if status != 200 else "", status == 200 and answered_right(reply, x, elements)


async def grpc_call(
    client: grpcclient.InferenceServerClient, elements: int, deadline: float, x: int, parameters: dict[str, float]
) -> Answer:
    tensor = grpcclient.InferInput("x", [elements], "INT64")
    tensor.set_data_from_numpy(np.full(elements, x, dtype=np.int64))
    timeout = parameters.get("timeout")  # tritonclient sends it as the OIP timeout parameter (µs)
    sleep = {"sleep": parameters["sleep"]} if "sleep" in parameters else None
    try:
        result = await client.infer(
            "soak",
            [tensor],
            parameters=sleep,
            timeout=None if timeout is None else int(timeout),
            client_timeout=deadline,
        )
    except InferenceServerException as e:
        code = str(e.status()).removeprefix("StatusCode.")
        if code == "DEADLINE_EXCEEDED" and e.message() == "Deadline Exceeded":  # the client's own deadline
            raise TimeoutError from None
        return GRPC_STATUS.get(code, 0), f"{code}: {e.message()}", False
    y = result.as_numpy("y")
    return 200, "", y is not None and y.shape == (elements,) and bool((y == 2 * x).all())


async def client_loop(
    send: Callable[[int, dict[str, float]], Awaitable[Answer]],
    queue: asyncio.Queue[tuple[int, str]],
    outcome: Outcome,
) -> None:
    while not queue.empty():
        index, kind = queue.get_nowait()
        x = {"good": index % 1000, "timeout": index % 1000, "raise": RAISE, "crash": CRASH}[kind]
        parameters = TIMING_OUT if kind == "timeout" else {}
        try:
            status, text, right = await send(x, parameters)
        except (httpx.TimeoutException, TimeoutError):
            outcome.timeouts += 1
            continue
        except httpx.TransportError as e:
            status, text, right = 0, type(e).__name__, False
        if kind == "good":
            outcome.good += 1
            if right:
                outcome.good_right += 1
            else:
                key = f"{status} {text[:60]}"
                outcome.good_errors[key] = outcome.good_errors.get(key, 0) + 1
        elif kind == "timeout":
            outcome.timing_out += 1
            outcome.timing_out_504 += status == 504
            continue
        elif kind == "raise":
            outcome.raising += 1
            outcome.raising_named += status == 500 and "ValueError" in text
        else:
            outcome.crashing += 1
            outcome.crashing_named += status >= 500 and "WorkerDiedError" in text
        if status == 504:
            outcome.timeouts += 1


async def kill_workers(
    client: httpx.AsyncClient,
    period: float,
    done: asyncio.Event,
    outcome: Outcome,
    last_kill: list[float],
    rng: random.Random,
) -> None:
    while not done.is_set():
        try:
            await asyncio.wait_for(done.wait(), period)
            return
        except asyncio.TimeoutError:
            pass
        pids = [pid for step in (await client.get("/v2/health/ready")).json()["steps"] for pid in step["pids"]]
        if pids:
            try:
                os.kill(rng.choice(pids), signal.SIGKILL)
                outcome.kills += 1
                last_kill[0] = time.monotonic()
            except ProcessLookupError:
                pass


async def ready_after(client: httpx.AsyncClient, since: float) -> float:
    """Seconds from ``since`` until readiness holds with every worker back."""
    while True:
        detail = (await client.get("/v2/health/ready")).json()
        if detail["ready"] and all(s["alive"] == s["expected"] for s in detail["steps"]):
            return time.monotonic() - since
        await asyncio.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--raising", type=float, default=0.01)
    parser.add_argument("--crashing", type=float, default=0.01)
    parser.add_argument("--timing-out", type=float, default=0.0, help="fraction of requests that time out in a worker")
    parser.add_argument("--kill-every", type=float, default=1.0, help="seconds between SIGKILLs (0: no kill run)")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--frontends", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=10.0, help="the pod's request deadline, s")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--elements",
        type=int,
        default=1,
        help="int64s in each request's x; above 1 it travels as a binary tensor (8,192 and more: "
        "64 KiB, read into shared memory)",
    )
    parser.add_argument("--grpc", action="store_true", help="send the requests over gRPC (raw contents)")
    args = parser.parse_args()
    calm = asyncio.run(soak(args, 0, "without kills"))
    print(calm.report(), flush=True)
    if args.kill_every:
        stormy = asyncio.run(soak(args, args.kill_every, f"a random worker SIGKILLed every {args.kill_every:g} s"))
        print(stormy.report())
        ratio = (stormy.requests / stormy.seconds) / (calm.requests / calm.seconds)
        print(f"\nthroughput with kills / without: {ratio:.2f}")


if __name__ == "__main__":
    main()

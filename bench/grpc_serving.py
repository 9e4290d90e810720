"""gRPC serving benchmark (issue 20): our pod over gRPC against its own HTTP, and against Triton's gRPC and
HTTP front ends serving the same Python models through PyTriton.

Servers: ``aqueduct-N`` (our pod, ``server.workers: N``, gRPC on ``server.grpc_port``) and ``triton``
(``bench/serving/pytriton_app.py``: Triton 2.51 through PyTriton 0.7.0, one instance per model, dynamic
batching up to 64 without a queue delay, as our ``batch_size: 64, batch_timeout: 0``). Models: ``noop``
(``x`` INT64 [3] echoed as ``y``) and ``image`` (a 150 KB UINT8 [224,224,3] image -> ``label`` INT64 [1],
``bench/serving/image_model.py`` for both servers); Triton's requests carry a batch dimension of 1 first.

Levels, on 127.0.0.1, closed loop, one warm-up run then ``--duration`` seconds measured:

- HTTP: wrk (Debian's), one thread, one keep-alive connection per client, the requests of
  ``bench/serving/run.py`` (noop JSON; image as the OIP binary tensor extension), c = 1 and 64.
- gRPC: h2load (Debian's ``nghttp2-client``), one thread: a unary ModelInfer call is an HTTP/2 POST of
  one length-prefixed ``ModelInferRequest`` (raw input contents, as ``tritonclient.grpc`` sends them).
  c = 1, c = 64 as 64 connections x 1 stream, and for the image 4 connections x 16 streams too.

h2load counts an HTTP 200 as a success whatever the ``grpc-status`` in its trailers, so the gRPC outcomes
come from the servers: our ``/metrics`` (``aqueduct_grpc_requests_total`` by code) and Triton's
metrics port (``nv_inference_request_success`` / ``_failure``), read before and after each level.
``errors`` counts the load generator's failures and every code but OK and CANCELLED (h2load resets the
streams still in flight when its time is up). Before loading, one call with the very request h2load
sends is checked for its answer (``tritonclient.grpc``'s stub and ``InferResult``).

Per row: req/s, p50/p99 latency, errors, the server's CPU (all the processes of its group) in % of
one CPU and per request, and the load generator's CPU in % of one CPU (its own thread: near 100 %
means it, not the server, is the bottleneck). The machine is shared and noisy: compare the rows of
one sitting only.

    apt-get install -y nghttp2-client wrk
    /usr/bin/python3.11 -m venv /tmp/venv-pytriton && /tmp/venv-pytriton/bin/pip install nvidia-pytriton==0.7.0
    .venv/bin/python bench/grpc_serving.py --json rows.json

``$AQUEDUCT_PYTHON`` replaces ``.venv/bin/python`` for our pod (as in ``bench/serving/run.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.processes import free_port  # noqa: E402
from bench.serving.image_model import labels  # noqa: E402
from bench.serving.run import command, files_for, group_cpu_seconds, image, requests, serving, wrk  # noqa: E402

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
LABELS = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Level:
    """One load level: ``connections`` x ``streams`` concurrent calls (``streams`` > 1: gRPC only)."""

    protocol: str
    connections: int
    streams: int = 1


@dataclass
class Load:
    """What a load generator reports of one run."""

    rps: float
    count: int
    errors: int
    p50_ms: float
    p99_ms: float


@dataclass
class Target:
    """A running server: its process group, ports, and how to read its gRPC outcomes for a model."""

    server: str
    pgid: int
    http_port: int
    grpc_port: int
    outcomes: Callable[[str], Counter[str]]


@dataclass
class Row:
    server: str
    protocol: str
    model: str
    concurrency: int
    connections: int
    streams: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    server_cpu_percent: float
    cpu_us_per_request: float
    client_cpu_percent: float
    grpc_codes: dict[str, int] = field(default_factory=dict)


def levels(model: str) -> list[Level]:
    """The levels run on ``model``."""
    found = [Level("http", 1), Level("http", 64), Level("grpc", 1), Level("grpc", 64)]
    return [*found, Level("grpc", 4, 16)] if model == "image" else found


def grpc_call(server: str, model: str) -> tuple[service_pb2.ModelInferRequest, dict[str, np.ndarray]]:
    """The ModelInfer request of ``model`` as ``server`` takes it, and the outputs it must answer."""
    batch = (1,) if server == "triton" else ()
    if model == "noop":
        name, datatype, x = "x", "INT64", np.array([1, 2, 3], dtype=np.int64).reshape(*batch, 3)
        expected = {"y": x}
    else:
        name, datatype, x = "image", "UINT8", image().reshape(*batch, 224, 224, 3)
        expected = {"label": labels(image()[None]).reshape(*batch, 1)}
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request, expected


def grpc_frame(request: service_pb2.ModelInferRequest) -> bytes:
    """``request`` as the body of a unary gRPC call: not compressed, its length, the message."""
    message: bytes = request.SerializeToString()
    return b"\0" + len(message).to_bytes(4, "big") + message


def check_grpc(port: int, request: service_pb2.ModelInferRequest, expected: dict[str, np.ndarray]) -> None:
    """Call ModelInfer with ``request`` (retrying for 60 s while the server is not up) and check its outputs."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        deadline = time.monotonic() + 60
        while True:
            try:
                reply = stub.ModelInfer(request, timeout=10)
                break
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    result = grpcclient.InferResult(reply)
    for name, want in expected.items():
        got = result.as_numpy(name)
        if got is None or got.shape != want.shape or not np.array_equal(got, want):
            raise RuntimeError(f"{request.model_name} on port {port}: output {name} is {got!r}, not {want!r}")


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    """The samples of the Prometheus text at ``http://127.0.0.1:port/metrics``: (name, labels, value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            name, _, labels_text = series.partition("{")
            samples.append((name, dict(LABELS.findall(labels_text)), float(value)))
    return samples


def aqueduct_outcomes(port: int, model: str) -> Counter[str]:
    """ModelInfer calls our pod has answered so far, by gRPC code (its pod serves one model)."""
    found: Counter[str] = Counter()
    for name, tags, value in scrape(port):
        if name == "aqueduct_grpc_requests_total" and tags.get("method") == "ModelInfer":
            found[tags["code"]] += int(value)
    return found


def triton_outcomes(port: int, model: str) -> Counter[str]:
    """Inferences of ``model`` Triton has finished so far: OK, or its failure reason."""
    found: Counter[str] = Counter()
    for name, tags, value in scrape(port):
        if tags.get("model") != model:
            continue
        if name == "nv_inference_request_success":
            found["OK"] += int(value)
        elif name == "nv_inference_request_failure":
            found[tags["reason"]] += int(value)
    return found


def h2load(port: int, body_file: str, level: Level, seconds: float, log_file: str) -> Load:
    """One timed h2load run of unary ModelInfer calls with the framed request in ``body_file``; its per-call
    lines go to ``log_file`` (emptied first: h2load appends)."""
    Path(log_file).unlink(missing_ok=True)
    argv = ["h2load", "-D", str(max(1, round(seconds))), "-c", str(level.connections), "-m", str(level.streams)]
    argv += ["-t", "1", "-d", body_file, "-H", "content-type: application/grpc", "-H", "te: trailers"]
    argv += [f"--log-file={log_file}", f"http://127.0.0.1:{port}{MODEL_INFER}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    rate = re.search(r"finished in \S+, ([\d.]+) req/s", out)
    counts = re.search(r"requests: \d+ total, \d+ started, (\d+) done, \d+ succeeded, (\d+) failed, (\d+) errored, "
                       r"(\d+) timeout", out)  # fmt: skip
    if rate is None or counts is None:
        raise RuntimeError(f"unexpected h2load output:\n{out}")
    done, failed, errored, timeout = (int(n) for n in counts.groups())
    times = sorted(int(line.split()[2]) for line in Path(log_file).read_text().splitlines())
    if not times:
        raise RuntimeError(f"h2load logged no request:\n{out}")
    return Load(
        float(rate[1]),
        done,
        failed + errored + timeout,
        times[len(times) // 2] / 1e3,
        times[len(times) * 99 // 100] / 1e3,
    )


def children_cpu_seconds() -> float:
    """CPU seconds of this process's ended and waited-for children (the load generators)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(target: Target, model: str, level: Level, args: argparse.Namespace, tmp: str) -> Row:
    """A warm-up run and a measured run of ``level`` on ``model``; the row of the measured one."""
    name = f"{target.server}-{model}-{level.protocol}"
    if level.protocol == "http":
        files = files_for(requests(target.server)[model], tmp, name)
        concurrency = level.connections

        def run(seconds: float) -> Load:
            rps, count, errors, p50, p99 = wrk(target.http_port, *files, concurrency, seconds)
            return Load(float(rps), int(count), int(errors), float(p50), float(p99))
    else:
        body_file = str(Path(tmp) / f"{name}.grpc")
        Path(body_file).write_bytes(grpc_frame(grpc_call(target.server, model)[0]))
        log_file = str(Path(tmp) / "h2load.log")

        def run(seconds: float) -> Load:
            return h2load(target.grpc_port, body_file, level, seconds, log_file)

    run(args.warmup)
    outcomes_before: Counter[str] = target.outcomes(model) if level.protocol == "grpc" else Counter()
    cpu_before, client_before, start = group_cpu_seconds(target.pgid), children_cpu_seconds(), time.perf_counter()
    load = run(args.duration)
    wall = time.perf_counter() - start
    cpu, client = group_cpu_seconds(target.pgid) - cpu_before, children_cpu_seconds() - client_before
    time.sleep(args.settle)
    codes: Counter[str] = Counter()
    if level.protocol == "grpc":
        codes = target.outcomes(model)
        codes.subtract(outcomes_before)
    rejected = sum(n for code, n in codes.items() if code not in ("OK", "CANCELLED", "CANCELED"))
    return Row(
        target.server,
        level.protocol,
        model,
        level.connections * level.streams,
        level.connections,
        level.streams,
        load.rps,
        load.p50_ms,
        load.p99_ms,
        load.errors + rejected,
        100 * cpu / wall,
        1e6 * cpu / max(1, load.count),
        100 * client / wall,
        {code: n for code, n in codes.items() if n},
    )


def consecutive_free_ports(count: int) -> int:
    """The first of ``count`` consecutive TCP ports on 127.0.0.1 that nothing listens on now."""
    for _ in range(100):
        base = free_port()
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise RuntimeError(f"found no {count} consecutive free ports")


@contextlib.contextmanager
def started(server: str, models: list[str], args: argparse.Namespace, log: Path) -> Iterator[Target]:
    """``server`` serving ``models`` (our pod serves one), checked over gRPC, stopped on leaving; its output
    goes to ``log``."""
    if server == "triton":
        http_port = consecutive_free_ports(3)
        grpc_port, metrics_port = http_port + 1, http_port + 2
        argv = [args.pytriton_python, str(REPO / "bench/serving/pytriton_app.py"), "--port", str(http_port)]
        env, stop = dict(os.environ), signal.SIGINT
    else:
        (model,) = models
        http_port, grpc_port = free_port(), free_port()
        metrics_port = http_port
        argv, env = command(server, model, http_port, "")
        env["AQUEDUCT_SERVER__GRPC_PORT"] = str(grpc_port)
        stop = signal.SIGTERM
    ready = requests(server)[models[-1]]
    with serving(f"{server} ({', '.join(models)})", argv, env, http_port, ready, stop, log) as proc:
        for model in models:
            check_grpc(grpc_port, *grpc_call(server, model))
        read = triton_outcomes if server == "triton" else aqueduct_outcomes
        yield Target(server, proc.pid, http_port, grpc_port, lambda model: read(metrics_port, model))


def ratios(rows: list[Row]) -> list[str]:
    """The issue's goals, as markdown lines, from whichever rows were measured."""

    def row(server: str, protocol: str, model: str, connections: int, streams: int = 1) -> Row | None:
        key = (server, protocol, model, connections, streams)
        return next((r for r in rows if (r.server, r.protocol, r.model, r.connections, r.streams) == key), None)

    lines = []
    triton = row("triton", "grpc", "image", 64)
    triton_http = row("triton", "http", "image", 64)
    for server in dict.fromkeys(r.server for r in rows if r.server != "triton"):
        ours, ours_http = row(server, "grpc", "image", 64), row(server, "http", "image", 64)
        if ours and ours_http:
            lines.append(f"- {server} image c=64: gRPC / HTTP req/s = {ours.rps / ours_http.rps:.2f}")
        if ours and triton:
            lines.append(f"- {server} image c=64: gRPC / Triton gRPC req/s = {ours.rps / triton.rps:.2f}")
        if ours_http and triton_http:
            lines.append(f"- {server} image c=64: HTTP / Triton HTTP req/s = {ours_http.rps / triton_http.rps:.2f}")
    for server in dict.fromkeys(r.server for r in rows):
        grpc_row, http_row = row(server, "grpc", "noop", 1), row(server, "http", "noop", 1)
        if grpc_row and http_row:
            lines.append(f"- {server} noop c=1 p50: gRPC {grpc_row.p50_ms:.3f} ms, HTTP {http_row.p50_ms:.3f} ms")
    return lines


def markdown(r: Row) -> str:
    """``r`` as a line of the table that ``main`` prints."""
    return (
        f"| {r.server} | {r.protocol} | {r.model} | {r.concurrency} | {r.connections} x {r.streams} | {r.rps:,.0f} | "
        f"{r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} | {r.server_cpu_percent:.0f} | {r.cpu_us_per_request:.0f} | "
        f"{r.client_cpu_percent:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default="aqueduct-1,aqueduct-2,triton", help="aqueduct-N and/or triton")
    parser.add_argument("--models", default="noop,image", help="noop and/or image")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of measured load per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each level")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds after each level")
    parser.add_argument("--pytriton-python", default="/tmp/venv-pytriton/bin/python")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    for tool, package in (("h2load", "nghttp2-client"), ("wrk", "wrk")):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install -y {package}")
    # SIGTERM unwinds like Ctrl-C, so that every server started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    models = args.models.split(",")
    rows: list[Row] = []
    print("| server | protocol | model | c | conns x streams | req/s | p50 ms | p99 ms | errors | server CPU % "
          "| server CPU µs/req | client CPU % |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for server in args.servers.split(","):
            for served in [models] if server == "triton" else [[m] for m in models]:
                log = Path(tmp) / f"{server}-{'-'.join(served)}.log"
                try:
                    with started(server, served, args, log) as target:
                        for model in served:
                            for level in levels(model):
                                rows.append(measure(target, model, level, args, tmp))
                                print(markdown(rows[-1]), flush=True)
                except (OSError, RuntimeError, subprocess.SubprocessError, grpc.RpcError) as error:
                    # One server failing (say, a pod that died under load) leaves the others' rows to run.
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                    print(f"{server} ({', '.join(served)}) failed: {error!r}\n{tail}", file=sys.stderr, flush=True)
    print()
    print("\n".join(ratios(rows)))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()

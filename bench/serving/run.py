"""HTTP serving benchmark: our pod (``server.workers`` 1 and more) against mosec, on the same models.

Load: wrk (Debian's ``wrk``), one thread, closed loop, one keep-alive connection per client, on
127.0.0.1 only, bounded by ``--duration`` per level. Models (``bench/serving/models.py``):
``noop`` (JSON ``x`` INT64 [3] echoed as ``y``) and ``image`` (a 150 KB UINT8 [224,224,3] image
sent as binary, the OIP binary tensor extension for us, the raw body for mosec; a numpy stand-in
for the model). Every server runs one model worker; mosec batches up to 64 with a 5 ms wait, we
batch up to 64 without waiting (``batch_timeout: 0``).

Prints one row per server, model and concurrency: req/s, p50/p99 latency, the server's CPU (all
its processes) and its CPU time per request. The machine is shared and noisy: compare the rows of
one sitting only.

    apt-get install -y wrk
    python3 -m venv /tmp/venv-mosec && /tmp/venv-mosec/bin/pip install mosec==0.9.8 numpy
    .venv/bin/python bench/serving/run.py --servers aqueduct-1,aqueduct-2,mosec --models noop,image

``$AQUEDUCT_PYTHON`` replaces ``.venv/bin/python`` for our pod; ``$WRK`` names a wrk binary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from bench.processes import free_port, group_pids, group_processes  # noqa: E402

HERE = Path(__file__).resolve().parent
LUA = """
local f = io.open(os.getenv("BODY"), "rb"); wrk.body = f:read("*a"); f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("CTYPE")
local h = os.getenv("HLEN")
if h and h ~= "" then wrk.headers["Inference-Header-Content-Length"] = h end
done = function(s, lat, req)
  local e = s.errors
  io.write(string.format("RESULT %.1f %d %d %.3f %.3f\\n", s.requests / (s.duration / 1e6), s.requests,
    e.status + e.connect + e.read + e.write + e.timeout, lat:percentile(50) / 1000, lat:percentile(99) / 1000))
end
"""


@dataclass
class Row:
    server: str
    model: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_percent: float
    cpu_us_per_request: float


@dataclass
class Request:
    path: str
    body: bytes
    content_type: str
    header_length: int | None = None


def image() -> np.ndarray:
    """The image every benchmark request carries: 224x224x3 uint8, the same at every call."""
    return np.random.RandomState(0).randint(0, 255, (224, 224, 3)).astype(np.uint8)


def requests(server: str) -> dict[str, Request]:
    """The request of each model, as ``server`` takes it (``triton``: with a batch dimension of 1 first)."""
    image_bytes = image().tobytes()
    if server == "mosec":
        return {
            "noop": Request("/inference", b'{"x":[1,2,3]}', "application/json"),
            "image": Request("/inference", image_bytes, "application/octet-stream"),
            "resnet": Request("/inference", image_bytes, "application/octet-stream"),
        }
    batch = [1] if server == "triton" else []
    noop = {"inputs": [{"name": "x", "shape": [*batch, 3], "datatype": "INT64", "data": [1, 2, 3]}]}
    tensor = {"name": "image", "shape": [*batch, 224, 224, 3], "datatype": "UINT8"}
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(image_bytes)}}]}).encode()
    body = header + image_bytes
    return {
        "noop": Request("/v2/models/noop/infer", json.dumps(noop).encode(), "application/json"),
        "image": Request("/v2/models/image/infer", body, "application/octet-stream", len(header)),
        "resnet": Request("/v2/models/resnet/infer", body, "application/octet-stream", len(header)),
    }


#: Our pod's config for each model.
CONFIGS = {
    "noop": REPO / "examples/noop/pipeline.yaml",
    "image": REPO / "bench/serving/image.yaml",
    "resnet": REPO / "bench/gpu/pipeline.yaml",
}


def command(server: str, model: str, port: int, mosec_python: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start ``server`` serving ``model`` on ``port``."""
    env = dict(os.environ)
    if server == "mosec":
        address = ["--port", str(port), "--address", "127.0.0.1", "--log-level", "error"]
        if model == "resnet":
            return [mosec_python, str(REPO / "bench/gpu/mosec_resnet.py"), *address], env
        return [mosec_python, str(HERE / "mosec_app.py"), "--model", model, *address], env
    env.pop("AQUEDUCT_PYTHON", None)  # the bench's own setting, not a config override (AQUEDUCT_*) for the pod
    path = os.pathsep.join(p for p in (str(REPO), str(REPO / "service"), env.get("PYTHONPATH", "")) if p)
    env.update(PYTHONPATH=path, AQUEDUCT_SERVER__WORKERS=server.split("-", 1)[1])
    python = os.environ.get("AQUEDUCT_PYTHON", str(REPO / ".venv/bin/python"))
    address = ["--host", "127.0.0.1", "--port", str(port)]
    return [python, "-m", "aqueduct_service", "--config", str(CONFIGS[model]), *address], env


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds used so far by every process of group ``pgid``."""
    return sum(cpu for _, cpu in group_processes(pgid).values())


def post(port: int, request: Request) -> int:
    headers = {"Content-Type": request.content_type}
    if request.header_length is not None:
        headers["Inference-Header-Content-Length"] = str(request.header_length)
    req = urllib.request.Request(f"http://127.0.0.1:{port}{request.path}", request.body, headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as reply:
            return int(reply.status)
    except (urllib.error.URLError, OSError):
        return 0


def wrk(port: int, request: Request, body_file: str, lua: str, concurrency: int, seconds: float) -> list[str]:
    env = dict(os.environ, BODY=body_file, CTYPE=request.content_type, HLEN=str(request.header_length or ""))
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            lua,
            f"http://127.0.0.1:{port}{request.path}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout
    return next(line for line in out.splitlines() if line.startswith("RESULT")).split()[1:]


@contextlib.contextmanager
def serving(
    name: str,
    argv: list[str],
    env: dict[str, str],
    port: int,
    request: Request,
    stop: int = signal.SIGTERM,
    log: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv`` in a session of its own (its output to ``log``, or dropped), wait (300 s at most) until
    ``request`` on ``port`` answers 200, and stop it afterwards: signal ``stop``, then SIGKILL to its process
    group after 30 s, or to what is left of the group (children the server did not stop) once it has exited."""
    with open(log or os.devnull, "wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=out, stderr=out, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while post(port, request) != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start serving")
            time.sleep(0.2)
        yield proc
    finally:
        os.kill(proc.pid, stop)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if group_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def load(
    server: str, model: str, pgid: int, port: int, files: tuple[Request, str, str], concurrency: int, seconds: float
) -> Row:
    """One level of wrk load (``files``: the request, its body file and the Lua script) on the server whose
    processes are group ``pgid``."""
    request, body_file, lua = files
    before, start = group_cpu_seconds(pgid), time.perf_counter()
    rps, count, errors, p50, p99 = wrk(port, request, body_file, lua, concurrency, seconds)
    cpu = group_cpu_seconds(pgid) - before
    wall = time.perf_counter() - start
    return Row(
        server,
        model,
        concurrency,
        float(rps),
        float(p50),
        float(p99),
        int(errors),
        100 * cpu / wall,
        1e6 * cpu / max(1, int(count)),
    )


def files_for(request: Request, tmp: str, name: str) -> tuple[Request, str, str]:
    """``request`` with its body written to a file under ``tmp`` and wrk's Lua script: what ``load`` takes."""
    body_file = os.path.join(tmp, f"{name}.body")
    Path(body_file).write_bytes(request.body)
    lua = os.path.join(tmp, "body.lua")
    Path(lua).write_text(LUA)
    return request, body_file, lua


def bench(server: str, model: str, concurrencies: list[int], args: argparse.Namespace, tmp: str) -> list[Row]:
    files = files_for(requests(server)[model], tmp, f"{server}-{model}")
    port = free_port()
    argv, env = command(server, model, port, args.mosec_python)
    rows = []
    stop = signal.SIGTERM if server != "mosec" else signal.SIGINT
    with serving(f"{server} ({model})", argv, env, port, files[0], stop) as proc:
        if args.warmup:
            wrk(port, files[0], files[1], files[2], max(concurrencies), args.warmup)
        for concurrency in concurrencies:
            rows.append(load(server, model, proc.pid, port, files, concurrency, args.duration))
            time.sleep(args.settle)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--servers",
        default="aqueduct-1,aqueduct-2,mosec",
        help="aqueduct-N (N front-end processes) and/or mosec, comma-separated",
    )
    parser.add_argument("--models", default="noop,image", help="noop, image and/or resnet (bench/gpu)")
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load per level")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--mosec-python", default="/tmp/venv-mosec/bin/python")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    rows: list[Row] = []
    if os.environ.get("WRK"):
        os.environ["PATH"] = os.path.dirname(os.environ["WRK"]) + os.pathsep + os.environ["PATH"]
    print("| server | model | c | req/s | p50 ms | p99 ms | errors | server CPU % | CPU µs/request |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for server in args.servers.split(","):
                for row in bench(server, model, concurrencies, args, tmp):
                    rows.append(row)
                    print(
                        f"| {row.server} | {row.model} | {row.concurrency} | {row.rps:,.0f} | {row.p50_ms:.2f} | "
                        f"{row.p99_ms:.2f} | {row.errors} | {row.cpu_percent:.0f} | {row.cpu_us_per_request:.0f} |",
                        flush=True,
                    )
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()

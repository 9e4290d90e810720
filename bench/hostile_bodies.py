"""Large request bodies against the serving pod (one process, an FP32 model answering one number): what each
costs it in memory and whether readiness keeps answering meanwhile.

One client sends requests of about ``--mib`` MiB back to back (over one keep-alive connection) while
another asks ``/v2/health/ready`` every 100 ms with a 2 s timeout (a Kubernetes probe's default is 1 s;
the issue's was 2 s). Scenarios: JSON FP32 data, the same tensor with the binary extension, and a JSON
BYTES tensor sent to the FP32 input. Printed per scenario: statuses, seconds per request, the main
process's peak RSS over its RSS before (and that divided by the body's size), readiness probes failed
and their slowest answer.

    .venv/bin/python bench/hostile_bodies.py                 # this checkout
    .venv/bin/python bench/hostile_bodies.py --tree /tmp/old # another checkout (e.g. a git worktree)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.processes import free_port  # noqa: E402

HANDLER = """
import numpy as np
from aqueduct import BaseTaskHandler


class SumHandler(BaseTaskHandler):
    def handle(self, *tasks):
        for task in tasks:
            task.outputs["y"] = np.array([task.inputs["x"].sum()], dtype=np.float32)
"""


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def bodies(mib: int) -> dict[str, tuple[bytes, dict[str, str]]]:
    """The scenarios' request bodies and headers, each about ``mib`` MiB."""
    budget = mib * 2**20 - 200
    count = budget // 4  # "0.5," per element
    head = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[%d],"data":[' % count
    fp32_json = head + b",".join([b"0.5"] * count) + b"]}]}"
    binary_count = budget // 4
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [binary_count],
                    "parameters": {"binary_data_size": binary_count * 4},
                }
            ]
        }
    ).encode()
    binary = header + np.full(binary_count, 0.5, np.float32).tobytes()
    strings = budget // 6  # '"abc",'
    bytes_json = b'{"inputs":[{"name":"x","datatype":"BYTES","shape":[%d],"data":[' % strings
    bytes_json += b",".join([b'"abc"'] * strings) + b"]}]}"
    return {
        "JSON FP32": (fp32_json, {}),
        "binary FP32": (binary, {"Inference-Header-Content-Length": str(len(header))}),
        "JSON BYTES to an FP32 input": (bytes_json, {}),
    }


class Prober(threading.Thread):
    """Asks readiness every 100 ms (2 s timeout) until stopped; keeps each probe's latency (None: failed)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/v2/health/ready"
        self.latencies: list[float | None] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=2) as reply:
                    ok = reply.status == 200
            except OSError:
                ok = False
            self.latencies.append(time.perf_counter() - start if ok else None)
            self.stop.wait(0.1)


class Peak(threading.Thread):
    """Samples ``pid``'s RSS every 10 ms until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            self.stop.wait(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", default=str(REPO), help="the checkout whose pod is measured")
    parser.add_argument("--mib", type=int, default=64, help="size of each body, MiB (the default body limit: 64)")
    parser.add_argument("--requests", type=int, default=4, help="requests per scenario, back to back")
    args = parser.parse_args()
    tree = Path(args.tree).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "hostile_handler.py").write_text(HANDLER)
        config = {
            "version": 1,
            "name": "sum",
            "steps": [{"name": "sum", "handler": "hostile_handler:SumHandler"}],
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
            "timeout": 120,
            "server": {"workers": 1, "log_level": "warning", "max_body_bytes": args.mib * 2**20},
        }
        Path(tmp, "pipeline.yaml").write_text(yaml.safe_dump(config))
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AQUEDUCT_")}
        env["PYTHONPATH"] = os.pathsep.join([str(tree), str(tree / "service"), tmp])
        proc = subprocess.Popen(
            [sys.executable, "-m", "aqueduct_service", "--config", f"{tmp}/pipeline.yaml", "--port", str(port)],
            cwd=tree,
            env=env,
            start_new_session=True,
        )
        try:
            run(proc, port, bodies(args.mib), args.requests)
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def run(proc: subprocess.Popen[bytes], port: int, scenarios: dict[str, tuple[bytes, dict[str, str]]], n: int) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the pod did not become ready")
        time.sleep(0.2)
    print(
        "| scenario | body | statuses | s/request | main RSS before → peak | peak − before | ÷ body "
        "| probes failed (2 s) | slowest probe |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (body, headers) in scenarios.items():
        before = rss_kib(proc.pid)
        peak, prober = Peak(proc.pid), Prober(port)
        peak.start()
        prober.start()
        statuses: dict[int, int] = {}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        start = time.perf_counter()
        for _ in range(n):
            conn.request("POST", "/v2/models/sum/infer", body, {"Content-Type": "application/json", **headers})
            reply = conn.getresponse()
            reply.read()
            statuses[reply.status] = statuses.get(reply.status, 0) + 1
        seconds = (time.perf_counter() - start) / n
        conn.close()
        time.sleep(0.3)
        prober.stop.set()
        peak.stop.set()
        prober.join()
        peak.join()
        failed = sum(1 for latency in prober.latencies if latency is None)
        slowest = max((latency for latency in prober.latencies if latency is not None), default=0.0)
        grown = (peak.peak - before) / 1024
        print(
            f"| {name} | {len(body) / 2**20:.1f} MiB | {statuses} | {seconds:.2f} | {before / 1024:.0f} → "
            f"{peak.peak / 1024:.0f} MiB | {grown:.0f} MiB | {grown * 2**20 / len(body):.1f}× | "
            f"{failed} of {len(prober.latencies)} | {slowest:.2f} s |"
        )


if __name__ == "__main__":
    main()

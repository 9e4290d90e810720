"""The built-in runtimes (issue 21) over HTTP: the onnx runtime against onnxruntime in process, and the
sklearn and xgboost runtimes against MLServer 1.7.1 and a hand-written handler, on the same model files.

Models (``bench/runtimes/models.py``, made in ``--models-dir`` unless there already): a ResNet-18 and a
small conv net in ONNX (UINT8 [N,224,224,3] in, top-1 class out), a LogisticRegression (joblib) and an
XGBoost booster of 1,000 trees (JSON) on 16 features.

Sections (``--sections``):

- ``onnx``: for each net of ``--convnets``, ``--rounds`` pairs of runs: ``onnxruntime.InferenceSession.run``
  in this process on one batch of 64 images back to back (intra-op threads: ``--threads``, all the CPUs by
  default), then the pod (``runtime: onnx``, batch_size 64, ``--onnx-window``, ``--onnx-threads``) under
  wrk at c = ``--onnx-concurrency`` (64), one 150 KB image per request as an OIP binary tensor.
  The pod's images/s is read from its ``/metrics`` (tasks handled between the first and the last batch
  that ended in the run, polled every 0.1 s), since wrk's count of a ``--onnx-duration`` run is off by up
  to one batch of seconds; wrk's figure is shown too. Also: the mean batch size (``aqueduct_batch_size``),
  the pod's CPU and the model worker's part of it.
- ``sklearn``, ``xgboost``: JSON requests of one row (FP64 for sklearn, FP32 for xgboost, 16 features)
  under wrk at each ``--concurrency`` level, against each of ``--servers``: ``aqueduct`` (the runtime,
  batch_size 64, 2 ms window; the joblib file with ``trust_pickle``), ``handler`` (xgboost only:
  ``bench/runtimes/handlers.py`` in the same pod) and ``mlserver`` (``mlserver-sklearn`` /
  ``mlserver-xgboost``, adaptive batching max_batch_size 64, max_batch_time 0.002, one parallel worker,
  as our pod has one model worker). ``NAME:N`` (xgboost) sets the model's threads to N. Every server
  ``--rounds`` times, every second round in reverse order; the ratios printed are of the medians.

Every server gets one front-end process (our ``server.workers: 1``; MLServer's one). Load: wrk
(Debian's ``wrk``), one thread, closed loop, one keep-alive connection per client, on 127.0.0.1, as
``bench/serving/run.py``. The machine is shared and noisy: compare the rows of one sitting only.

    apt-get install -y wrk
    python3 -m venv /tmp/venv-mlserver && /tmp/venv-mlserver/bin/pip install mlserver==1.7.1 \\
        mlserver-sklearn==1.7.1 mlserver-xgboost==1.7.1 'uvloop<0.22' scikit-learn==1.9.1 xgboost==3.2.0
    .venv/bin/python bench/runtimes/run.py --models-dir /tmp/rtb-models
    .venv/bin/python bench/runtimes/run.py --sections xgboost --servers aqueduct,handler --concurrency 64

``$AQUEDUCT_PYTHON`` replaces ``.venv/bin/python`` for our pod.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "service")]
from bench.processes import free_port, group_processes  # noqa: E402
from bench.runtimes.models import FEATURES, build, tabular_data  # noqa: E402
from bench.serving.run import Request, Row, files_for, load, serving, wrk  # noqa: E402

BATCH = 64
IMAGE_SHAPE = (224, 224, 3)


@dataclass
class OnnxRow:
    model: str
    in_process_images_per_s: float
    pod_images_per_s: float
    wrk_images_per_s: float
    ratio: float
    mean_batch: float
    pod_cpu_percent: float
    worker_cpu_percent: float
    in_process_cpu_percent: float
    p50_ms: float
    errors: int


@dataclass
class Sitting:
    started: str
    uptime_before: str
    commit: str
    argv: str = ""
    onnx: list[OnnxRow] = field(default_factory=list)
    tabular: list[Row] = field(default_factory=list)
    answers: dict[str, Any] = field(default_factory=dict)
    uptime_after: str = ""


# ---------------------------------------------------------------------------------------------- servers
def pod(name: str, config: dict[str, Any], port: int, tmp: str) -> tuple[list[str], dict[str, str]]:
    """Our pod serving ``config`` (written as YAML-compatible JSON) with one front-end process."""
    path = Path(tmp) / f"{name}.yaml"
    path.write_text(json.dumps(config))
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'service'}", AQUEDUCT_SERVER__WORKERS="1")
    env.pop("AQUEDUCT_PYTHON", None)  # the bench's own setting, not a config override (AQUEDUCT_*) for the pod
    python = os.environ.get("AQUEDUCT_PYTHON", str(REPO / ".venv/bin/python"))
    argv = [python, "-m", "aqueduct_service", "--config", str(path), "--host", "127.0.0.1", "--port", str(port)]
    return argv, env


def pod_config(name: str, step: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "name": name,
        "steps": [{"name": "model", "batch_size": BATCH, **step}],
        "queue_size": 4096,
        "timeout": 60,
        "start_timeout": 300,
        "server": {"log_level": "warning"},
        **top,
    }


def mlserver(name: str, implementation: str, uri: Path, port: int, tmp: str, mlserver_bin: str) -> list[str]:
    """``mlserver start`` on a folder of its settings: adaptive batching 64 / 2 ms, one parallel worker."""
    folder = Path(tmp) / f"mlserver-{name}"
    (folder / name).mkdir(parents=True, exist_ok=True)
    settings = {
        "debug": False,
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "parallel_workers": 1,
        "logging_level": "WARNING",
    }
    (folder / "settings.json").write_text(json.dumps(settings))
    model = {
        "name": name,
        "implementation": implementation,
        "parameters": {"uri": str(uri)},
        "max_batch_size": BATCH,
        "max_batch_time": 0.002,
    }
    (folder / name / "model-settings.json").write_text(json.dumps(model))
    return [mlserver_bin, "start", str(folder)]


# ---------------------------------------------------------------------------------------------- helpers
def metric(text: str, name: str) -> float:
    """The sum of every sample of ``name`` (any labels) in a Prometheus text exposition."""
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def wait_idle(port: int, bound: float = 120.0) -> None:
    """Wait (``bound`` s at most) until the pod has no inference request in flight."""
    deadline = time.monotonic() + bound
    while metric(scrape(port), "aqueduct_http_requests_in_flight") > 0:
        if time.monotonic() > deadline:
            raise RuntimeError("the pod still has requests in flight")
        time.sleep(0.1)


def answer(port: int, request: Request) -> list[Any]:
    """The first output's data of ``request``'s JSON answer."""
    headers = {"Content-Type": request.content_type}
    if request.header_length is not None:
        headers["Inference-Header-Content-Length"] = str(request.header_length)
    req = urllib.request.Request(f"http://127.0.0.1:{port}{request.path}", request.body, headers)
    with urllib.request.urlopen(req, timeout=60) as reply:
        return list(json.loads(reply.read())["outputs"][0]["data"])


def cpu_by_pid(pgid: int) -> dict[int, float]:
    return {pid: cpu for pid, (_, cpu) in group_processes(pgid).items()}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()


# ---------------------------------------------------------------------------------------------- onnx
def image_request(model: str) -> Request:
    image = np.random.RandomState(0).randint(0, 255, IMAGE_SHAPE).astype(np.uint8).tobytes()
    tensor = {"name": "image", "shape": [1, *IMAGE_SHAPE], "datatype": "UINT8"}
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(image)}}]}).encode()
    return Request(f"/v2/models/{model}/infer", header + image, "application/octet-stream", len(header))


class InProcess:
    """onnxruntime in this process on one batch of 64 images, run back to back."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.images = np.random.default_rng(0).integers(0, 256, (BATCH, *IMAGE_SHAPE), dtype=np.uint8)
        self.session.run(["label"], {"image": self.images})

    def measure(self, seconds: float) -> tuple[float, float]:
        """(images/s, CPU % of this process) over whole batches for ``seconds`` at least."""
        batches, cpu0, start = 0, time.process_time(), time.perf_counter()
        while time.perf_counter() - start < seconds:
            self.session.run(["label"], {"image": self.images})
            batches += 1
        wall = time.perf_counter() - start
        return BATCH * batches / wall, 100 * (time.process_time() - cpu0) / wall


class TaskClock(threading.Thread):
    """Polls the pod's ``aqueduct_batch_size`` every 0.1 s: when each batch ended and the tasks handled."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.changes: list[tuple[float, float, float]] = []  # (time, tasks handled, batches)

    def run(self) -> None:
        last = -1.0
        while not self.stop.wait(0.1):
            text = scrape(self.port)
            tasks, batches = metric(text, "aqueduct_batch_size_sum"), metric(text, "aqueduct_batch_size_count")
            if tasks != last:
                self.changes.append((time.perf_counter(), tasks, batches))
                last = tasks

    def rates(self) -> tuple[float, float]:
        """(images/s between the first and the last batch that ended, mean batch size of those between)."""
        if len(self.changes) < 2:
            return 0.0, 0.0
        (t0, n0, b0), (t1, n1, b1) = self.changes[0], self.changes[-1]
        return (n1 - n0) / (t1 - t0), (n1 - n0) / max(1.0, b1 - b0)


def onnx_section(args: argparse.Namespace, models: Path, tmp: str, sitting: Sitting) -> None:
    """Each net: the pod started and warmed up, then ``--rounds`` pairs of (in process, pod) measurements."""
    threads = args.threads or len(os.sched_getaffinity(0))
    for net in args.convnets.split(","):
        path = models / f"{net}.onnx"
        baseline = InProcess(path, threads)
        request = image_request(net)
        files = files_for(request, tmp, f"onnx-{net}")
        port = free_port()
        step: dict[str, Any] = {"runtime": "onnx", "model": str(path), "batch_timeout": args.onnx_window}
        if args.onnx_threads:
            step["options"] = {"threads": args.onnx_threads}
        argv, env = pod(f"onnx-{net}", pod_config(net, step), port, tmp)
        with serving(f"pod ({net})", argv, env, port, request) as proc:
            sitting.answers[f"onnx {net}"] = answer(port, request)
            wrk(port, *files, args.onnx_concurrency, args.warmup)
            wait_idle(port)
            for _ in range(args.rounds):
                ips, ip_cpu = baseline.measure(args.onnx_duration)
                print(f"  {net}: onnxruntime in process {ips:,.1f} images/s, CPU {ip_cpu:.0f}%", flush=True)
                sitting.onnx.append(pod_round(net, proc.pid, port, files, args, ips, ip_cpu))
                wait_idle(port)


def pod_round(
    net: str, pgid: int, port: int, files: tuple[Request, str, str], args: argparse.Namespace, ips: float, cpu: float
) -> OnnxRow:
    """One wrk run on the pod, its images/s from ``/metrics``, against the in-process figure ``ips``."""
    clock = TaskClock(port)
    clock.start()
    before = cpu_by_pid(pgid)
    row = load("aqueduct", net, pgid, port, files, args.onnx_concurrency, args.onnx_duration)
    after = cpu_by_pid(pgid)
    clock.stop.set()
    clock.join()
    worker = 100 * sum(c - before.get(pid, 0.0) for pid, c in after.items() if pid != pgid) / args.onnx_duration
    pod_ips, mean_batch = clock.rates()
    print(
        f"  {net}: pod {pod_ips:,.1f} images/s (wrk {row.rps:,.1f}), {pod_ips / ips:.2f}x, mean batch "
        f"{mean_batch:.1f}, pod CPU {row.cpu_percent:.0f}% (worker {worker:.0f}%)",
        flush=True,
    )
    return OnnxRow(
        net, ips, pod_ips, row.rps, pod_ips / ips, mean_batch, row.cpu_percent, worker, cpu, row.p50_ms, row.errors
    )


# ---------------------------------------------------------------------------------------------- tabular
def tabular_request(kind: str, path: str) -> Request:
    row = tabular_data(1)[0][0]
    datatype = "FP64" if kind == "sklearn" else "FP32"
    body = {"inputs": [{"name": "input", "shape": [1, FEATURES], "datatype": datatype, "data": row.tolist()}]}
    return Request(path, json.dumps(body).encode(), "application/json")


def tabular_section(kind: str, args: argparse.Namespace, models: Path, tmp: str, sitting: Sitting) -> None:
    """Each server of ``--servers`` in turn, ``--rounds`` times (every second round in reverse order)."""
    servers = args.servers.split(",")
    for round_ in range(args.rounds):
        for server in servers if round_ % 2 == 0 else servers[::-1]:
            tabular_server(kind, server, args, models, tmp, sitting)


def tabular_server(kind: str, server: str, args: argparse.Namespace, models: Path, tmp: str, sitting: Sitting) -> None:
    uri = models / ("sklearn/model.joblib" if kind == "sklearn" else "xgboost/model.json")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    base, _, threads = server.partition(":")
    if kind != "xgboost" and (base == "handler" or threads):
        return
    port = free_port()
    stop = signal.SIGTERM
    if base == "mlserver":
        implementation = f"mlserver_{kind}.{'SKLearnModel' if kind == 'sklearn' else 'XGBoostModel'}"
        argv, env = mlserver(kind, implementation, uri, port, tmp, args.mlserver), dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = threads
        stop = signal.SIGINT
    elif base == "aqueduct":
        step = {"runtime": kind, "model": str(uri), "batch_timeout": 0.002}
        options: dict[str, Any] = {"trust_pickle": True} if kind == "sklearn" else {}
        if threads:
            options["threads"] = int(threads)
        step["options"] = options
        argv, env = pod(f"{kind}-runtime", pod_config(kind, step), port, tmp)
    elif base == "handler":
        step = {
            "handler": "bench.runtimes.handlers:XGBoostHandler",
            "options": {"model": str(uri), "threads": int(threads or 0)},
            "batch_timeout": 0.002,
        }
        config = pod_config(
            kind,
            step,
            batch_dim=True,
            inputs=[{"name": "input", "datatype": "FP32", "shape": [-1, FEATURES]}],
            outputs=[{"name": "predict", "datatype": "FP32", "shape": [-1]}],
        )
        argv, env = pod(f"{kind}-handler", config, port, tmp)
    else:
        raise SystemExit(f"unknown server {server!r}: aqueduct, handler or mlserver, each with :THREADS or not")
    request = tabular_request(kind, f"/v2/models/{kind}/infer")
    files = files_for(request, tmp, f"{kind}-{server}")
    with serving(f"{server} ({kind})", argv, env, port, request, stop) as proc:
        sitting.answers[f"{kind} {server}"] = answer(port, request)
        if args.warmup:
            wrk(port, *files, max(concurrencies), args.warmup)
        for concurrency in concurrencies:
            time.sleep(args.settle)
            row = load(server, kind, proc.pid, port, files, concurrency, args.duration)
            sitting.tabular.append(row)
            print(
                f"  {kind} {server} c={concurrency}: {row.rps:,.0f} req/s, p50 {row.p50_ms:.2f} ms, p99 "
                f"{row.p99_ms:.2f} ms, errors {row.errors}, CPU {row.cpu_percent:.0f}%, "
                f"{row.cpu_us_per_request:.0f} µs/request",
                flush=True,
            )


# ---------------------------------------------------------------------------------------------- report
def report(sitting: Sitting) -> None:
    print(f"\n{sitting.started}, commit {sitting.commit}: run.py {sitting.argv}")
    print(f"before: {sitting.uptime_before}\nafter:  {sitting.uptime_after}")
    if sitting.onnx:
        print(
            "\n| model | onnxruntime in process, images/s | pod, images/s (wrk's count) | pod / in process | "
            "mean batch | in-process CPU % | pod CPU % (model worker) | images per CPU-second, in process / pod | "
            "pod p50 ms | errors |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for o in sitting.onnx:
            alone, served = o.in_process_images_per_s / o.in_process_cpu_percent, o.pod_images_per_s / o.pod_cpu_percent
            print(
                f"| {o.model} | {o.in_process_images_per_s:,.1f} | {o.pod_images_per_s:,.1f} "
                f"({o.wrk_images_per_s:,.1f}) | **{o.ratio:.2f}×** | {o.mean_batch:.1f} | "
                f"{o.in_process_cpu_percent:.0f} | {o.pod_cpu_percent:.0f} ({o.worker_cpu_percent:.0f}) | "
                f"{100 * alone:,.0f} / {100 * served:,.0f} = {served / alone:.2f}× | {o.p50_ms:.0f} | {o.errors} |"
            )
    if sitting.tabular:
        print("\n| model | server | c | req/s | p50 ms | p99 ms | errors | server CPU % | CPU µs/request |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in sitting.tabular:
            print(
                f"| {r.model} | {r.server} | {r.concurrency} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
                f"{r.errors} | {r.cpu_percent:.0f} | {r.cpu_us_per_request:.0f} |"
            )
        rps: dict[tuple[str, str, int], list[float]] = {}
        p50: dict[tuple[str, str, int], list[float]] = {}
        for r in sitting.tabular:
            rps.setdefault((r.model, r.server, r.concurrency), []).append(r.rps)
            p50.setdefault((r.model, r.server, r.concurrency), []).append(r.p50_ms)
        print("\nratios (medians over the rounds):")
        for kind, server, concurrency in rps:
            if concurrency != 64 or server.startswith("mlserver"):
                continue
            for other in sorted({s for k, s, _ in rps if k == kind and s != server}):
                if (kind, other, 64) not in rps or (server.startswith("handler") and not other.startswith("aqueduct")):
                    continue
                ours, theirs = statistics.median(rps[kind, server, 64]), statistics.median(rps[kind, other, 64])
                line = f"- {kind}: c = 64 {server} / {other} {ours:,.0f} / {theirs:,.0f} = {ours / theirs:.2f}×"
                if (kind, server, 1) in p50 and (kind, other, 1) in p50:
                    mine, its = statistics.median(p50[kind, server, 1]), statistics.median(p50[kind, other, 1])
                    line += f"; c = 1 p50 {mine:.2f} vs {its:.2f} ms"
                print(line)
    print("\nanswers:", json.dumps({k: v[:4] for k, v in sitting.answers.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="onnx,sklearn,xgboost", help="onnx, sklearn and/or xgboost")
    parser.add_argument("--models-dir", help="where the model files are (made there when missing); default: a temp dir")
    parser.add_argument("--convnets", default="resnet18,convnet", help="onnx nets: resnet18 and/or convnet")
    parser.add_argument("--onnx-duration", type=float, default=30.0, help="seconds per onnx measurement")
    parser.add_argument("--onnx-window", type=float, default=0.01, help="the onnx step's batch_timeout, s")
    parser.add_argument("--onnx-concurrency", type=int, default=BATCH, help="wrk's connections for the onnx pod")
    parser.add_argument("--onnx-threads", type=int, default=0, help="the onnx runtime's threads (default: its own)")
    parser.add_argument("--threads", type=int, default=0, help="in-process intra-op threads (default: the CPUs)")
    parser.add_argument(
        "--servers",
        default="aqueduct,handler,mlserver",
        help="tabular: aqueduct (the runtime), handler (xgboost only) and/or mlserver; NAME:N (xgboost only) sets "
        "the model's threads to N (the runtime's threads option, the handler's nthread, OMP_NUM_THREADS for MLServer)",
    )
    parser.add_argument("--concurrency", default="64,1", help="tabular wrk levels")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per tabular level")
    parser.add_argument(
        "--rounds", type=int, default=2, help="onnx: (in process, pod) pairs; tabular: every server this many times"
    )
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--mlserver", default="/tmp/venv-mlserver/bin/mlserver")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--report", metavar="JSON", help="print the tables of a sitting written by --json, run nothing")
    args = parser.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        saved["onnx"] = [OnnxRow(**o) for o in saved["onnx"]]
        saved["tabular"] = [Row(**r) for r in saved["tabular"]]
        report(Sitting(**saved))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    sitting = Sitting(started, uptime(), commit.stdout.strip(), " ".join(sys.argv[1:]))
    print(f"before: {sitting.uptime_before}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(args.models_dir or Path(tmp) / "models")
        if not (models / "xgboost/model.json").exists() or not (models / "convnet.onnx").exists():
            print(f"making the models in {models}", flush=True)
            build(models)
        for section in args.sections.split(","):
            if section == "onnx":
                onnx_section(args, models, tmp, sitting)
            else:
                tabular_section(section, args, models, tmp, sitting)
    sitting.uptime_after = uptime()
    report(sitting)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(sitting), indent=1))


if __name__ == "__main__":
    main()

"""The ASGI app: OIP v2 routes over one flow, plus health, metadata and metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from aqueduct import Flow
from aqueduct.exceptions import FlowError
from aqueduct.remote import Lease

from .backend import FlowBackend, LocalBackend
from .errors import RETRY_AFTER_SECONDS, InferenceError, from_engine_error
from .grpc_api.http2 import Limits as GrpcLimits
from .grpc_api.service import InferenceService, start_grpc
from .health import ServingState
from .inference import InferRequest, check_inputs, check_requested_outputs, decode_request, encode_response
from .limits import LEASE_MIN_BYTES, THREAD_DECODE_BYTES, BudgetHold, DecodeBudget
from .logs import REQUEST_ID, AccessLog, FailureLog, bind_request_id, header_request_id
from .metrics import GrpcMetrics, HttpMetrics, MetricsMiddleware
from .model_config import triton_model_config
from .outputs import declared_outputs
from .settings import Settings, TensorSpec
from .task import InferenceTask

log = logging.getLogger("aqueduct_service")

_JSON = b"application/json"
INFER_ROUTE = "/v2/models/{name}/infer"


class _ClientGone(Exception):
    """The client disconnected before its request body arrived."""


def create_app(flow: Flow | FlowBackend, settings: Settings, state: ServingState | None = None) -> Starlette:
    """Build the serving app for ``flow``, described by ``settings``.

    The app's lifespan starts the flow in the background (liveness answers while workers run
    ``on_start``; readiness waits for them) and stops it gracefully on shutdown. ``state`` lets the
    caller flip the pod to draining (not ready, new requests refused) before the server shuts down.
    ``flow`` is a ``Flow`` run in this process, or a ``FlowBackend`` (a front end of a multi-process pod).
    """
    state = state or ServingState()
    backend: FlowBackend = (
        LocalBackend(flow, settings.start_timeout, settings.server.graceful_timeout) if isinstance(flow, Flow) else flow
    )
    metrics = HttpMetrics(backend.http_registry)
    access_log = AccessLog(settings.server.access_log)
    model = settings.name
    metadata = orjson.dumps(_model_metadata(settings))
    model_config = orjson.dumps(triton_model_config(settings))
    server_metadata = orjson.dumps({"name": "aqueduct", "version": _version(), "extensions": ["binary_tensor_data"]})

    def model_or_404(request: Request) -> None:
        if request.path_params["name"] != model:
            raise InferenceError(404, f"model {request.path_params['name']!r} not found (this pod serves {model!r})")

    async def server_info(request: Request) -> Response:
        return Response(server_metadata, media_type="application/json")

    async def live(request: Request) -> Response:
        return _json({"live": True})

    async def readiness() -> tuple[bool, dict[str, Any]]:
        try:
            health = await backend.health()
        except FlowError as e:
            return False, {"ready": False, "error": f"{type(e).__name__}: {e}"}
        return state.readiness(health)

    async def ready(request: Request) -> Response:
        is_ready, detail = await readiness()
        return _json(detail, 200 if is_ready else 503)

    async def model_metadata(request: Request) -> Response:
        model_or_404(request)
        return Response(metadata, media_type="application/json")

    async def triton_config(request: Request) -> Response:
        model_or_404(request)
        if request.path_params.get("version", "1") != "1":
            raise InferenceError(404, f"model {model!r} has no version {request.path_params['version']!r} (only 1)")
        return Response(model_config, media_type="application/json")

    async def model_ready(request: Request) -> Response:
        model_or_404(request)
        is_ready, _ = await readiness()
        return _json({"name": model, "ready": is_ready}, 200 if is_ready else 503)

    async def prometheus(request: Request) -> Response:
        try:
            text = await backend.metrics()
        except FlowError as e:
            return _json({"error": f"metrics unavailable: {type(e).__name__}: {e}"}, 503)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    async def inference_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, InferenceError)
        return Response(_error_body(exc), exc.status, exc.headers, media_type="application/json")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _json({"error": exc.detail}, exc.status_code, dict(exc.headers or {}))

    endpoint = InferenceEndpoint(backend, settings, state)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await backend.start(state)
        grpc_server = None
        try:
            if settings.server.grpc_port:
                grpc_server = await start_grpc(
                    InferenceService(
                        endpoint, settings, readiness, GrpcMetrics(backend.http_registry), metrics, _version()
                    ),
                    settings.server.host,
                    settings.server.grpc_port,
                    GrpcLimits(
                        max_message_bytes=settings.server.max_body_bytes,
                        max_header_bytes=settings.server.max_header_bytes,
                        header_timeout=settings.server.header_timeout,
                        body_timeout=settings.server.body_timeout,
                        max_connections=settings.server.max_connections,
                        max_buffered_bytes=endpoint.budget.limit,
                    ),
                )
            yield
        finally:
            state.draining = True
            if grpc_server is not None:  # calls in flight finish within what HTTP's drain left of graceful_timeout
                await grpc_server.stop(state.drain_left(settings.server.graceful_timeout))
            await backend.stop()

    routes = [
        Route("/v2", server_info),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2/models/{name}", model_metadata),
        Route("/v2/models/{name}/ready", model_ready),
        Route("/v2/models/{name}/config", triton_config),
        Route("/v2/models/{name}/versions/{version}/config", triton_config),
        Route("/metrics", prometheus),
    ]
    return ServingApp(
        endpoint,
        metrics,
        access_log,
        routes=routes,
        middleware=[Middleware(MetricsMiddleware, metrics=metrics, access_log=access_log)],
        exception_handlers={InferenceError: inference_error, HTTPException: http_error},
        lifespan=lifespan,
    )


class ServingApp(Starlette):
    """Starlette, with ``POST /v2/models/{name}/infer`` answered before any framework layer (the hot path)."""

    def __init__(self, infer: InferenceEndpoint, metrics: HttpMetrics, access_log: AccessLog, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.infer = infer
        self.metrics = metrics
        self.access_log = access_log
        self.in_flight = metrics.in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            if path.startswith("/v2/models/") and path.endswith("/infer"):
                name = path[len("/v2/models/") : -len("/infer")]
                if name and "/" not in name:
                    start = time.perf_counter()
                    self.in_flight.inc()
                    try:
                        status = await self.infer(name, receive, send, scope["headers"])
                    finally:
                        self.in_flight.dec()
                    elapsed = time.perf_counter() - start
                    self.metrics.observe("POST", INFER_ROUTE, status, elapsed)
                    self.access_log("POST", path, status, elapsed)
                    return
        await super().__call__(scope, receive, send)


class InferenceEndpoint:
    """``POST /v2/models/{name}/infer``: plain ASGI, no per-request framework objects."""

    def __init__(self, backend: FlowBackend, settings: Settings, state: ServingState) -> None:
        self.backend = backend
        self.settings = settings
        self.state = state
        self.max_body = settings.server.max_body_bytes
        #: With ``batch_dim``, the most rows a request may carry: the first step's batch size.
        self.max_rows = settings.steps[0].batch_size if settings.batch_dim else None
        #: The pod's budget for bodies being read and decoded, shared evenly by its HTTP processes.
        self.budget = DecodeBudget(max(1, settings.server.decode_budget_bytes // settings.server.front_ends))
        self.failures = FailureLog()

    async def __call__(self, name: str, receive: Receive, send: Send, headers: list[tuple[bytes, bytes]]) -> int:
        """Answer one request; returns the HTTP status sent (499: the client left first)."""
        REQUEST_ID.set(header_request_id(headers))
        try:
            body, response_headers = await self._infer(name, receive, headers)
            status = 200
        except InferenceError as e:
            status, body = e.status, _error_body(e)
            response_headers = [(b"content-type", _JSON)]
            response_headers += [(k.lower().encode(), v.encode()) for k, v in e.headers.items()]
        except _ClientGone:
            return 499
        except Exception as e:
            log.exception("inference request failed")
            status, body = 500, orjson.dumps({"error": f"internal error: {type(e).__name__}: {e}"})
            response_headers = [(b"content-type", _JSON)]
        response_headers.append((b"x-request-id", (REQUEST_ID.get() or bind_request_id(None)).encode()))
        response_headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": body})
        return status

    async def _infer(
        self, name: str, receive: Receive, headers: list[tuple[bytes, bytes]]
    ) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        self.admit(name)
        header_length = None
        body_length = None
        for key, value in headers:
            if key == b"content-length":
                if not value.isdigit():
                    raise InferenceError(400, "Content-Length is not a number")
                body_length = int(value)
                if body_length > self.max_body:
                    raise InferenceError(
                        413, f"request body of {body_length} bytes is over the limit of {self.max_body}"
                    )
            elif key == b"inference-header-content-length":
                if not value.isdigit():
                    raise InferenceError(400, "Inference-Header-Content-Length is not a number")
                header_length = int(value)
            elif key == b"content-encoding" and value.lower() != b"identity":
                raise InferenceError(415, f"Content-Encoding {value.decode(errors='replace')!r} is not supported")
        hold = self.budget.hold(body_length or 0)
        lease = self.backend.lease(body_length) if body_length and body_length >= LEASE_MIN_BYTES else None
        try:
            try:
                body = await self._read_body(receive, lease, body_length, hold)
                request = await self._decode(body, header_length)
            finally:
                hold.release()
            outputs = await self.run(request, (lease,) if lease else ())
            payload, response_header_length = encode_response(self.settings.name, request, outputs)
        finally:
            if lease:
                lease.free()
        if response_header_length is None:
            return payload, [(b"content-type", _JSON)]
        return payload, [
            (b"content-type", b"application/octet-stream"),
            (b"inference-header-content-length", str(response_header_length).encode()),
        ]

    def admit(self, name: str) -> None:
        """Refuse a request for another model (404) or while the pod drains (503)."""
        if name != self.settings.name:
            raise InferenceError(404, f"model {name!r} not found (this pod serves {self.settings.name!r})")
        if self.state.draining:
            raise InferenceError(503, "the server is shutting down", {"Retry-After": RETRY_AFTER_SECONDS})

    async def run(
        self, request: InferRequest, leases: tuple[Lease, ...] = (), deadline: float | None = None
    ) -> dict[str, np.ndarray]:
        """Check a decoded request, run it through the flow and return its outputs, checked against the
        model's (HTTP and gRPC alike). ``deadline``: the client's, in seconds from now, when it is sooner."""
        check_inputs(request.inputs, self.settings.inputs, self.max_rows)
        check_requested_outputs(request, self.settings.outputs)
        task = InferenceTask(request.inputs, request.parameters, bind_request_id(request.id))
        if self.max_rows is not None:  # batch_size counts rows: a request weighs its rows
            task.set_weight(len(next(iter(request.inputs.values()))))
        timeout = self.settings.timeout
        if request.parameters:
            timeout = self._apply_parameters(task, request.parameters)
        if deadline is not None:
            timeout = min(timeout, deadline)
        try:
            # the flow holds the leases too, until no worker can touch them: freeing ours after this never
            # hands a block to another request while a worker still runs this one (after a 504, say)
            await self.backend.process(task, timeout_sec=timeout, leases=leases)
        except FlowError as e:
            self.failures.task_failed(e)
            raise from_engine_error(e) from None
        return declared_outputs(request, task.outputs, self.settings.outputs, bool(self.settings.batch_dim))

    def _apply_parameters(self, task: InferenceTask, parameters: dict[str, Any]) -> float:
        """Apply the OIP ``priority`` and ``timeout`` (microseconds, as Triton) parameters; return the deadline."""
        priority = parameters.get("priority", 0)
        if type(priority) is not int or not 0 <= priority < self.settings.queue_priorities:
            raise InferenceError(
                400, f"parameters.priority: must be an integer from 0 to {self.settings.queue_priorities - 1}"
            )
        if priority:
            task.set_priority(priority)
        timeout_us = parameters.get("timeout")
        if timeout_us is None:
            return self.settings.timeout
        if type(timeout_us) not in (int, float) or not timeout_us > 0:
            raise InferenceError(400, "parameters.timeout: must be a positive number of microseconds")
        return float(timeout_us) / 1e6

    async def _decode(self, body: bytes | memoryview, header_length: int | None) -> InferRequest:
        args = (body, header_length, self.max_body, self.settings.inputs, self.max_rows)
        if len(body) >= THREAD_DECODE_BYTES:
            return await asyncio.to_thread(decode_request, *args)
        return decode_request(*args)

    async def _read_body(
        self, receive: Receive, lease: Lease | None, length: int | None, hold: BudgetHold
    ) -> bytes | memoryview:
        """The request body: read into ``lease`` (shared memory, where its tensors travel on from) when
        given, else into ordinary memory (one buffer of ``length`` for a large body). Without a
        Content-Length ``length``, ``hold`` grows with the body."""
        chunks: list[bytes] = []
        size = 0
        buffer: memoryview | None = lease.buffer if lease else None
        if buffer is None and length is not None and length >= LEASE_MIN_BYTES:
            buffer = memoryview(bytearray(length))
        limit = len(buffer) if buffer is not None else self.max_body
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            end = size + len(chunk)
            if end > limit:
                if buffer is not None:
                    raise InferenceError(400, f"request body is longer than its Content-Length of {limit}")
                raise InferenceError(413, f"request body is over the limit of {self.max_body} bytes")
            if length is None:
                hold.take(len(chunk))
            if buffer is not None:
                buffer[size:end] = chunk
            else:
                chunks.append(chunk)
            size = end
            if not message.get("more_body", False):
                if buffer is not None:
                    return buffer[:size]
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type="application/json")


def _error_body(error: InferenceError) -> bytes:
    return orjson.dumps({"error": error.message, **error.extra})


def _tensor_metadata(tensors: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors]


def _model_metadata(settings: Settings) -> dict[str, Any]:
    return {
        "name": settings.name,
        "versions": ["1"],
        "platform": settings.platform,
        "inputs": _tensor_metadata(settings.inputs),
        "outputs": _tensor_metadata(settings.outputs),
        "parameters": {
            "steps": [
                {
                    "name": step.name,
                    **({"runtime": step.runtime, "model": step.model} if step.runtime else {"handler": step.handler}),
                    "nprocs": step.nprocs,
                    "batch_size": step.batch_size,
                    "batch_timeout": step.batch_timeout,
                    "latency_target": step.latency_target,
                    "handle_condition": step.handle_condition,
                }
                for step in settings.steps
            ],
            "batch_dim": bool(settings.batch_dim),
            "queue_size": settings.queue_size,
            "queue_priorities": settings.queue_priorities,
            "timeout": settings.timeout,
        },
    }


def _version() -> str:
    try:
        return version("aqueduct-serving")
    except PackageNotFoundError:
        return "0+unknown"

"""``inference.GRPCInferenceService`` and ``grpc.health.v1.Health`` on grpcio's asyncio server, in the
event loop of the HTTP process that starts it, over the same flow as HTTP.

A ``ModelInfer`` call becomes the decoded request an HTTP one does (``codec``) and goes through the
same checks, task and flow (``InferenceEndpoint.run``); the client's deadline bounds the task's. An
HTTP status becomes a gRPC code (``grpc_code``). Every front-end process binds ``server.grpc_port``
(grpcio sets ``SO_REUSEPORT``), so the kernel spreads connections over them as it does HTTP's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2

from aqueduct.remote import Lease

from ..errors import InferenceError
from ..limits import LEASE_MIN_BYTES
from ..logs import REQUEST_ID, bind_request_id
from ..metrics import GrpcMetrics, HttpMetrics
from ..settings import Settings
from . import oip_pb2 as pb
from .codec import decode_infer_request, encode_infer_response

if TYPE_CHECKING:  # app imports this module
    from ..app import InferenceEndpoint

log = logging.getLogger("aqueduct_service")

SERVICE = "inference.GRPCInferenceService"
HEALTH_SERVICE = "grpc.health.v1.Health"
Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


def grpc_code(error: InferenceError) -> grpc.StatusCode:
    """The gRPC status code of an answer the HTTP path gives ``error.status``."""
    if error.grpc_code is not None:
        return getattr(grpc.StatusCode, error.grpc_code)
    if error.status == 404:
        return grpc.StatusCode.NOT_FOUND
    if 400 <= error.status < 500:
        return grpc.StatusCode.INVALID_ARGUMENT
    if error.status == 503:
        return grpc.StatusCode.UNAVAILABLE
    if error.status == 504:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.INTERNAL


class InferenceService:
    """The handlers of ``inference.GRPCInferenceService`` (and ``grpc.health.v1.Health``'s ``Check``)."""

    def __init__(
        self,
        endpoint: InferenceEndpoint,
        settings: Settings,
        readiness: Readiness,
        metrics: GrpcMetrics,
        http_metrics: HttpMetrics,
        version: str,
    ) -> None:
        self.endpoint = endpoint
        self.settings = settings
        self.readiness = readiness
        self.metrics = metrics
        self.in_flight = http_metrics.in_flight
        self.server_metadata = pb.ServerMetadataResponse(name="aqueduct", version=version)
        self.model_metadata = pb.ModelMetadataResponse(
            name=settings.name,
            versions=["1"],
            platform=settings.platform,
            inputs=[
                pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
                for t in settings.inputs
            ],
            outputs=[
                pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
                for t in settings.outputs
            ],
        )

    def handlers(self) -> tuple[grpc.GenericRpcHandler, grpc.GenericRpcHandler]:
        """The generic handlers of both services, for ``aio.Server.add_generic_rpc_handlers``."""
        methods: dict[str, tuple[Callable[[Any, Any], Awaitable[Any]], Any]] = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest),
            "ServerMetadata": (self.server_info, pb.ServerMetadataRequest),
            "ModelMetadata": (self.model_info, pb.ModelMetadataRequest),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest),
        }
        inference = grpc.method_handlers_generic_handler(
            SERVICE, {name: self._unary(name, call, request) for name, (call, request) in methods.items()}
        )
        health = grpc.method_handlers_generic_handler(
            HEALTH_SERVICE, {"Check": self._unary("Health.Check", self.health_check, health_pb2.HealthCheckRequest)}
        )
        return inference, health

    def _unary(self, name: str, call: Callable[[Any, Any], Awaitable[Any]], request: Any) -> grpc.RpcMethodHandler:
        metrics = self.metrics

        async def observed(message: Any, context: aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = "OK"
            try:
                return await call(message, context)
            except InferenceError as e:
                code = grpc_code(e).name
                await context.abort(grpc_code(e), e.message)
            except asyncio.CancelledError:  # the client left, or its deadline passed
                code = "CANCELLED"
                raise
            except Exception as e:
                log.exception("gRPC call %s failed", name)
                code = "INTERNAL"
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
            finally:
                metrics.observe(name, code, time.perf_counter() - start)

        return grpc.unary_unary_rpc_method_handler(
            observed, request_deserializer=request.FromString, response_serializer=_serialize
        )

    async def server_live(self, message: pb.ServerLiveRequest, context: aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(
        self, message: pb.ServerReadyRequest, context: aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        ready, _ = await self.readiness()
        return pb.ServerReadyResponse(ready=ready)

    async def model_ready(self, message: pb.ModelReadyRequest, context: aio.ServicerContext) -> pb.ModelReadyResponse:
        self._model(message.name, message.version)
        ready, _ = await self.readiness()
        return pb.ModelReadyResponse(ready=ready)

    async def server_info(
        self, message: pb.ServerMetadataRequest, context: aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return self.server_metadata

    async def model_info(
        self, message: pb.ModelMetadataRequest, context: aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        self._model(message.name, message.version)
        return self.model_metadata

    async def health_check(
        self, message: health_pb2.HealthCheckRequest, context: aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        if message.service not in ("", SERVICE):
            raise InferenceError(404, f"unknown service {message.service!r} (this server has {SERVICE!r})")
        ready, _ = await self.readiness()
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    async def model_infer(self, message: pb.ModelInferRequest, context: aio.ServicerContext) -> pb.ModelInferResponse:
        REQUEST_ID.set(_metadata_request_id(context))
        self.in_flight.inc()
        endpoint = self.endpoint
        lease: Lease | None = None
        try:
            endpoint.admit(message.model_name)
            self._model(message.model_name, message.model_version)
            raw = message.raw_input_contents
            size = sum(map(len, raw))
            lease = endpoint.backend.lease(size) if size >= LEASE_MIN_BYTES else None
            request = decode_infer_request(
                message, endpoint.max_body, self.settings.inputs, endpoint.max_rows, _copy_into(lease, raw)
            )
            # the flow holds the lease too, until no worker can touch it (as for HTTP bodies)
            outputs = await endpoint.run(request, (lease,) if lease else (), deadline=context.time_remaining())
            return encode_infer_response(self.settings.name, request, outputs, raw=bool(raw))
        finally:
            if lease is not None:
                lease.free()
            self.in_flight.dec()
            context.set_trailing_metadata((("x-request-id", REQUEST_ID.get() or bind_request_id(None)),))

    def _model(self, name: str, version: str) -> None:
        if name != self.settings.name:
            raise InferenceError(404, f"model {name!r} not found (this pod serves {self.settings.name!r})")
        if version not in ("", "1"):
            raise InferenceError(404, f"model {name!r} has no version {version!r} (only 1)")


async def start_grpc(service: InferenceService, host: str, port: int, max_message_bytes: int) -> aio.Server:
    """Start serving ``service`` on ``host:port`` in the running event loop."""
    server = aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 1),
        ]
    )
    server.add_generic_rpc_handlers(service.handlers())
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if not server.add_insecure_port(address):
        raise OSError(f"gRPC could not bind {address}")
    await server.start()
    log.info("serving gRPC on %s", address)
    return server


def _copy_into(lease: Lease | None, raw: Sequence[bytes]) -> list[memoryview] | None:
    """``raw`` copied into ``lease`` (shared memory: the tensors reach the workers without another copy),
    one view each; None without a lease."""
    if lease is None:
        return None
    views = []
    offset = 0
    for data in raw:
        end = offset + len(data)
        lease.buffer[offset:end] = data
        views.append(lease.buffer[offset:end])
        offset = end
    return views


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def _metadata_request_id(context: aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and 0 < len(value) <= 128 and value.isprintable():
            return value
    return None

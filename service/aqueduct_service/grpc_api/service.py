"""``inference.GRPCInferenceService`` and ``grpc.health.v1.Health`` served by ``http2.GrpcServer`` in the
event loop of the HTTP process that starts it, over the same flow as HTTP.

A ``ModelInfer`` call becomes the decoded request an HTTP one does (``codec``) and goes through the
same checks, task and flow (``InferenceEndpoint.run``); the client's deadline bounds the task's. An
HTTP status becomes a gRPC code (``grpc_code``). Every front-end process binds ``server.grpc_port``
(``SO_REUSEPORT``), so the kernel spreads connections over them as it does HTTP's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from google.protobuf.message import DecodeError

from aqueduct.remote import Lease

from ..errors import InferenceError
from ..limits import LEASE_MIN_BYTES, THREAD_DECODE_BYTES
from ..logs import REQUEST_ID, bind_request_id
from ..metrics import GrpcMetrics, HttpMetrics
from ..settings import Settings
from . import oip_pb2 as pb
from .codec import decode_infer_request, encode_infer_response, split_raw_contents
from .http2 import Call, GrpcError, GrpcServer, Limits, Method

if TYPE_CHECKING:  # app imports this module
    from ..app import InferenceEndpoint

log = logging.getLogger("aqueduct_service")

SERVICE = "inference.GRPCInferenceService"
HEALTH_SERVICE = "grpc.health.v1.Health"
Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]
#: Seconds between two looks at readiness for a ``Health/Watch`` call.
WATCH_INTERVAL_S = 1.0


def grpc_code(error: InferenceError) -> str:
    """The name of the gRPC status code of an answer the HTTP path gives ``error.status``."""
    if error.grpc_code is not None:
        return error.grpc_code
    if error.status == 404:
        return "NOT_FOUND"
    if 400 <= error.status < 500:
        return "INVALID_ARGUMENT"
    if error.status == 503:
        return "UNAVAILABLE"
    if error.status == 504:
        return "DEADLINE_EXCEEDED"
    return "INTERNAL"


class InferenceService:
    """The handlers of ``inference.GRPCInferenceService`` and ``grpc.health.v1.Health``."""

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

    def methods(self) -> dict[str, Method]:
        """The methods of both services, by path."""
        unary: dict[str, tuple[Callable[[Any, Call], Awaitable[Any]], Callable[[memoryview], Any]]] = {
            "ServerLive": (self.server_live, _parser(pb.ServerLiveRequest)),
            "ServerReady": (self.server_ready, _parser(pb.ServerReadyRequest)),
            "ModelReady": (self.model_ready, _parser(pb.ModelReadyRequest)),
            "ServerMetadata": (self.server_info, _parser(pb.ServerMetadataRequest)),
            "ModelMetadata": (self.model_info, _parser(pb.ModelMetadataRequest)),
        }
        methods = {f"/{SERVICE}/{name}": self._unary(name, call, parse) for name, (call, parse) in unary.items()}
        # a large ModelInfer message arrives in shared memory: its raw contents go on to the workers from there
        infer = self._unary("ModelInfer", self.model_infer, split_raw_contents, gather=self._lease)
        methods[f"/{SERVICE}/ModelInfer"] = infer
        check = self._unary("Health.Check", self.health_check, _parser(pb.HealthCheckRequest))
        methods[f"/{HEALTH_SERVICE}/Check"] = check
        methods[f"/{HEALTH_SERVICE}/Watch"] = Method(self.health_watch, "stream")
        return methods

    def _unary(
        self,
        name: str,
        handler: Callable[[Any, Call], Awaitable[Any]],
        parse: Callable[[memoryview], Any],
        gather: Callable[[int], Lease | None] | None = None,
    ) -> Method:
        metrics = self.metrics

        async def observed(data: memoryview, call: Call) -> bytes:
            start = time.perf_counter()
            code = "OK"
            try:
                # a large message (typed contents above all) is parsed in a thread: the loop keeps answering
                message = await asyncio.to_thread(parse, data) if len(data) >= THREAD_DECODE_BYTES else parse(data)
                answer: bytes = (await handler(message, call)).SerializeToString()
                return answer
            except GrpcError as e:
                code = e.code
                raise
            except InferenceError as e:
                code = grpc_code(e)
                raise GrpcError(code, e.message) from None
            except asyncio.CancelledError:  # the client left, or reset the stream
                code = "CANCELLED"
                raise
            except Exception as e:
                log.exception("gRPC call %s failed", name)
                code = "INTERNAL"
                raise GrpcError(code, f"internal error: {type(e).__name__}: {e}") from None
            finally:
                metrics.observe(name, code, time.perf_counter() - start)

        return Method(observed, gather=gather)

    def _lease(self, nbytes: int) -> Lease | None:
        return self.endpoint.backend.lease(nbytes) if nbytes >= LEASE_MIN_BYTES else None

    async def server_live(self, message: pb.ServerLiveRequest, call: Call) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, message: pb.ServerReadyRequest, call: Call) -> pb.ServerReadyResponse:
        ready, _ = await self.readiness()
        return pb.ServerReadyResponse(ready=ready)

    async def model_ready(self, message: pb.ModelReadyRequest, call: Call) -> pb.ModelReadyResponse:
        self._model(message.name, message.version)
        ready, _ = await self.readiness()
        return pb.ModelReadyResponse(ready=ready)

    async def server_info(self, message: pb.ServerMetadataRequest, call: Call) -> pb.ServerMetadataResponse:
        return self.server_metadata

    async def model_info(self, message: pb.ModelMetadataRequest, call: Call) -> pb.ModelMetadataResponse:
        self._model(message.name, message.version)
        return self.model_metadata

    async def health_check(self, message: pb.HealthCheckRequest, call: Call) -> pb.HealthCheckResponse:
        if message.service not in ("", SERVICE):
            raise InferenceError(404, f"unknown service {message.service!r} (this server has {SERVICE!r})")
        ready, _ = await self.readiness()
        status = pb.HealthCheckResponse.SERVING if ready else pb.HealthCheckResponse.NOT_SERVING
        return pb.HealthCheckResponse(status=status)

    async def health_watch(self, data: memoryview, call: Call) -> AsyncIterator[bytes]:
        """``Health/Watch``: the status now, then each change, until the client leaves or the pod stops."""
        message = _parser(pb.HealthCheckRequest)(data)
        if message.service not in ("", SERVICE):
            status = pb.HealthCheckResponse.SERVICE_UNKNOWN
            yield pb.HealthCheckResponse(status=status).SerializeToString()
            return
        last = None
        while not self.endpoint.state.draining:
            ready, _ = await self.readiness()
            status = pb.HealthCheckResponse.SERVING if ready else pb.HealthCheckResponse.NOT_SERVING
            if status != last:
                yield pb.HealthCheckResponse(status=status).SerializeToString()
                last = status
            await asyncio.sleep(WATCH_INTERVAL_S)
        yield pb.HealthCheckResponse(status=pb.HealthCheckResponse.NOT_SERVING).SerializeToString()

    async def model_infer(
        self, request: tuple[pb.ModelInferRequest, list[memoryview]], call: Call
    ) -> pb.ModelInferResponse:
        message, raw = request  # raw: the raw contents, views of the call's bytes (split_raw_contents)
        REQUEST_ID.set(_metadata_request_id(call))
        self.in_flight.inc()
        endpoint = self.endpoint
        lease: Lease | None = None
        try:
            endpoint.admit(message.model_name)
            self._model(message.model_name, message.model_version)
            args = (message, endpoint.max_body, self.settings.inputs, endpoint.max_rows)
            if call.gathered is not None and raw:  # the message arrived in shared memory, its raw contents too
                lease = cast(Lease, call.gathered)
                decoded = decode_infer_request(*args, raw)
            elif raw:
                size = sum(map(len, raw))
                lease = endpoint.backend.lease(size) if size >= LEASE_MIN_BYTES else None
                decoded = decode_infer_request(*args, _copy_into(lease, raw) if lease is not None else raw)
            elif message.ByteSize() >= THREAD_DECODE_BYTES:  # typed contents become arrays in a thread
                decoded = await asyncio.to_thread(decode_infer_request, *args)
            else:
                decoded = decode_infer_request(*args)
            # the flow holds the lease too, until no worker can touch it (as for HTTP bodies)
            outputs = await endpoint.run(decoded, (lease,) if lease else (), deadline=call.time_remaining())
            return encode_infer_response(self.settings.name, decoded, outputs, raw=bool(raw))
        finally:
            if lease is not None:
                lease.free()
            self.in_flight.dec()
            call.trailers.append(("x-request-id", REQUEST_ID.get() or bind_request_id(None)))

    def _model(self, name: str, version: str) -> None:
        if name != self.settings.name:
            raise InferenceError(404, f"model {name!r} not found (this pod serves {self.settings.name!r})")
        if version not in ("", "1"):
            raise InferenceError(404, f"model {name!r} has no version {version!r} (only 1)")


async def start_grpc(service: InferenceService, host: str, port: int, limits: Limits) -> GrpcServer:
    """Start serving ``service`` on ``host:port`` in the running event loop."""
    methods = service.methods()
    names = {path: path.rsplit("/", 1)[-1] for path in methods}
    names[f"/{HEALTH_SERVICE}/Check"] = "Health.Check"
    names[f"/{HEALTH_SERVICE}/Watch"] = "Health.Watch"

    def refused(path: str, code: str) -> None:  # an unknown path is counted as one label, not as itself
        service.metrics.observe(names.get(path, "unknown"), code, 0.0)

    server = GrpcServer(methods, limits, refused)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        await server.start(host, port)
    except OSError as e:
        raise OSError(f"gRPC could not bind {address}: {e}") from None
    log.info("serving gRPC on %s", address)
    return server


def _copy_into(lease: Lease, raw: Sequence[memoryview]) -> list[memoryview]:
    """``raw`` copied into ``lease`` (shared memory: the tensors reach the workers without another copy),
    one view each."""
    views = []
    offset = 0
    for data in raw:
        end = offset + len(data)
        lease.buffer[offset:end] = data
        views.append(lease.buffer[offset:end])
        offset = end
    return views


def _parser(request: Any) -> Callable[[memoryview], Any]:
    """Parse a serialized ``request`` (a message class); a malformed one is INVALID_ARGUMENT."""

    def parse(data: memoryview) -> Any:
        try:
            return request.FromString(data)
        except DecodeError as e:
            raise GrpcError("INVALID_ARGUMENT", f"the request is not a {request.DESCRIPTOR.full_name}: {e}") from None

    return parse


def _metadata_request_id(call: Call) -> str | None:
    value = call.metadata.get("x-request-id")
    if value is not None and 0 < len(value) <= 128 and value.isprintable():
        return value
    return None

"""HTTP and gRPC metrics, registered beside the engine's in the flow's Prometheus registry."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .logs import AccessLog

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class HttpMetrics:
    """Request count by method, route and status, latency by method and route, and inference requests in flight."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "aqueduct_http_requests", "HTTP requests answered.", ["method", "route", "status"], registry=registry
        )
        self.latency = Histogram(
            "aqueduct_http_request_duration_seconds",
            "Time from the request's arrival to the end of its response.",
            ["method", "route"],
            registry=registry,
            buckets=_LATENCY_BUCKETS,
        )
        # What the autoscaler reads (autoscaling.metric: inFlight). "livesum": summed over live HTTP processes.
        self.in_flight = Gauge(
            "aqueduct_http_requests_in_flight",
            "Inference requests received and not yet answered.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        # labels() costs a lock and a dict lookup; cache the children per label set.
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._histograms: dict[tuple[str, str], Any] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        key = (method, route, status)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.requests.labels(method, route, str(status))
        counter.inc()
        histogram = self._histograms.get((method, route))
        if histogram is None:
            histogram = self._histograms[(method, route)] = self.latency.labels(method, route)
        histogram.observe(seconds)


class MetricsMiddleware:
    """ASGI middleware observing every HTTP request into ``HttpMetrics``, labelled by route template, and
    into the access log."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics, access_log: AccessLog) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            elapsed = time.perf_counter() - start
            self.metrics.observe(scope["method"], path, status, elapsed)
            self.access_log(scope["method"], scope["path"], status, elapsed)


class GrpcMetrics:
    """gRPC calls answered by method and status code, and their latency by method."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("aqueduct_grpc_requests", "gRPC calls answered.", ["method", "code"], registry=registry)
        self.latency = Histogram(
            "aqueduct_grpc_request_duration_seconds",
            "Time from a gRPC call's arrival to its answer.",
            ["method"],
            registry=registry,
            buckets=_LATENCY_BUCKETS,
        )

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Count one answered call; ``code``: its status code's name (``OK``, ``INVALID_ARGUMENT``...)."""
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

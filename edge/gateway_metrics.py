"""The gateway's own Prometheus metrics (``tandem_gateway_…``) and the registry its
``GET /metrics`` serves: the runtime's ``tandem_edge_…`` metrics
(:mod:`tandem.edge.metrics`) and these, in one scrape.

HTTP requests are counted by an ASGI middleware (:class:`HttpMetricsMiddleware`) by route
template, not raw path (``/v1/models/{model}``, anything unknown is ``other``), and status, so
no client can grow the label set. It runs on the server's event loop, one thread: plain ints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ROUTES = frozenset(
    ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/ready", "/metrics")
)
OTHER = "other"


def route_of(path: str) -> str:
    """The route template a path is counted under."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return OTHER


class HttpCounters:
    """Requests by (route, status) and the requests in flight; the event loop's thread only."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        self.in_flight = 0


class HttpMetricsMiddleware:
    """Counts every HTTP request when its response ends (a stream: when it is closed); a
    request whose handler raised before answering counts as 500."""

    def __init__(self, app: ASGIApp, counters: HttpCounters) -> None:
        self.app, self.counters = app, counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        c = self.counters
        c.in_flight += 1
        try:
            await self.app(scope, receive, send_status)
        finally:
            c.in_flight -= 1
            key = (route_of(scope["path"]), str(status))
            c.requests[key] = c.requests.get(key, 0) + 1


class GatewayCollector(Collector):
    """``tandem_gateway_…`` from the gateway's counters, read at scrape time. ``state()``:
    ``{"active", "queued", "served", "cancelled", "error"}`` (:class:`Gateway`'s)."""

    def __init__(self, http: HttpCounters, state: Callable[[], dict[str, int]]) -> None:
        self.http, self._state = http, state

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "tandem_gateway_http_requests",
            "HTTP requests by route template and status, counted when the response ends",
            labels=["route", "status"],
        )
        for (route, status), n in sorted(dict(self.http.requests).items()):
            requests.add_metric([route, status], n)
        yield requests
        yield GaugeMetricFamily(
            "tandem_gateway_http_requests_in_flight",
            "HTTP requests being answered now (streams included)",
            self.http.in_flight,
        )
        s = self._state()
        yield GaugeMetricFamily(
            "tandem_gateway_generations_active", "Generations holding a slot", s["active"]
        )
        yield GaugeMetricFamily(
            "tandem_gateway_generations_queued", "Requests waiting for a slot", s["queued"]
        )
        answers = CounterMetricFamily(
            "tandem_gateway_answers",
            "Generation requests by how they ended: served, cancelled (the client went away or "
            "stopped reading), error (a 500, or an error after the stream started)",
            labels=["outcome"],
        )
        for outcome in ("served", "cancelled", "error"):
            answers.add_metric([outcome], s[outcome])
        yield answers


class _Forward(Collector):
    """Another registry's metrics, collected when this one is (the runtime's, read lazily:
    the runtime is asked for its registry at the first scrape)."""

    def __init__(self, registry: Callable[[], CollectorRegistry]) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self._registry().collect()


def gateway_registry(
    runtime_registry: Callable[[], CollectorRegistry], collector: GatewayCollector
) -> CollectorRegistry:
    """One registry for ``/metrics``: the runtime's metrics, then the gateway's."""
    registry = CollectorRegistry()
    registry.register(_Forward(runtime_registry))
    registry.register(collector)
    return registry


def encode(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """The body and content type a scraper asked for (text format, or OpenMetrics)."""
    from prometheus_client.exposition import choose_encoder

    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type

"""``GET /metrics``: Prometheus text exposition of a store server.

Needs ``prometheus_client`` (``pip install "agl-async[metrics]"``), imported on the first scrape.
Without it the route answers ``501`` with a JSON error naming the extra, and the server runs no
request-metrics middleware at all.

Each server has its own ``CollectorRegistry`` (several servers in one process, as in tests, do not
see each other's numbers), holding the process collectors (``process_*``, ``python_gc_*``,
``python_info``) and one collector of this module that produces, at scrape time:

* ``agl_http_requests_total{route, method, status}``, ``agl_http_request_duration_seconds{route,
  method}`` (histogram) and ``agl_http_requests_in_flight`` from the
  :class:`~agl_async.http.request_metrics.RequestMetrics` middleware;
* ``agl_store_rollouts{status}``, ``agl_store_attempts{status}``, ``agl_store_workers{status}``,
  ``agl_store_spans``, ``agl_store_resources``, ``agl_store_queue_length`` from one
  ``store.statistics()`` call made by the scrape itself (nothing is updated on the hot path), plus
  ``agl_store_up`` (0 when that call failed or took longer than ``statistics_timeout``) and
  ``agl_store_statistics_duration_seconds``.

Cancellation: a scrape cancelled while ``statistics()`` runs leaves nothing behind (the snapshot is
taken and rendered with no await in between).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Scope

from ..store.base import LightningStore
from .app import HTTPError, StoreApp
from .request_metrics import RequestMetrics, RouteTemplates

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["EXTRA", "MetricsEndpoint", "install", "metrics_available"]

logger = logging.getLogger("agl_async")

#: The install hint named by the 501 answer.
EXTRA = 'pip install "agl-async[metrics]"'
_encoder = msgspec.json.Encoder()


def metrics_available() -> bool:
    """Whether ``prometheus_client`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("prometheus_client") is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules (tests do that)
        return False


class _StoreCollector:
    """Prometheus collector of the request counters and of the last store statistics."""

    def __init__(self, requests: RequestMetrics | None) -> None:
        self.requests = requests
        self.stats: dict[str, Any] | None = None
        self.stats_seconds = 0.0

    def describe(self) -> list[Any]:
        return []  # no up-front description: the families depend on what has been seen

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        if self.requests is not None:
            counter = CounterMetricFamily(
                "agl_http_requests",
                "HTTP requests answered, by route template, method and status code",
                labels=["route", "method", "status"],
            )
            for (route, method, status), n in sorted(self.requests.requests.items()):
                counter.add_metric([route, method, status], n)
            yield counter
            latency = HistogramMetricFamily(
                "agl_http_request_duration_seconds",
                "Time from receiving a request to the end of its answer, by route template and method",
                labels=["route", "method"],
            )
            for (route, method), histogram in sorted(self.requests.latency.items()):
                latency.add_metric([route, method], histogram.cumulative(), histogram.sum)
            yield latency
            yield GaugeMetricFamily(
                "agl_http_requests_in_flight", "HTTP requests being answered", value=self.requests.in_flight
            )

        stats = self.stats
        yield GaugeMetricFamily(
            "agl_store_up", "1 when the last store.statistics() succeeded", value=0 if stats is None else 1
        )
        yield GaugeMetricFamily(
            "agl_store_statistics_duration_seconds",
            "How long the store.statistics() call of this scrape took",
            value=self.stats_seconds,
        )
        if stats is None:
            return
        for key, name, what in (
            ("rollouts", "agl_store_rollouts", "Rollouts in the store by status"),
            ("attempts", "agl_store_attempts", "Attempts in the store by status"),
            ("workers", "agl_store_workers", "Workers known to the store by status"),
        ):
            family = GaugeMetricFamily(name, what, labels=["status"])
            for status, n in sorted((stats.get(key) or {}).items()):
                family.add_metric([str(status)], n)
            yield family
        for key, name, what in (
            ("total_spans", "agl_store_spans", "Spans stored"),
            ("total_resources", "agl_store_resources", "Resource snapshots stored"),
            ("queue_length", "agl_store_queue_length", "Rollouts waiting in the queue"),
        ):
            if isinstance(stats.get(key), (int, float)):
                yield GaugeMetricFamily(name, what, value=stats[key])


def install(app: StoreApp) -> None:
    """Serve ``GET /metrics`` on ``app`` (a row of the server's ``APP_EXTENSIONS``) behind the store
    routes' bearer token, and count every request with the request-metrics middleware, which is
    installed only when ``prometheus_client`` is importable (nothing is counted that nobody can
    scrape). Nothing at all with ``LightningStoreServer(..., metrics=False)``. Keeps the endpoint
    in ``app.extensions["metrics"]`` and the middleware in ``app.extensions["request_metrics"]``.
    Nothing here owns a task or a resource."""
    if not app.options.get("metrics", True):
        return
    endpoint = MetricsEndpoint(app.store, None)
    app.extensions["metrics"] = endpoint
    app.add_route("/metrics", endpoint.endpoint, methods=("GET",), auth=True)
    if metrics_available():

        def count_requests(inner: ASGIApp) -> ASGIApp:
            requests = RequestMetrics(inner, _TemplatesOf(app))
            endpoint.bind(requests)
            app.extensions["request_metrics"] = requests
            return requests

        app.add_middleware(count_requests)


class _TemplatesOf:
    """The route templates of ``app``, read on the first request (when every extension has added
    its routes)."""

    def __init__(self, app: StoreApp) -> None:
        self._app = app
        self._templates: RouteTemplates | None = None

    def __call__(self, scope: Scope) -> str:
        templates = self._templates
        if templates is None:
            templates = self._templates = RouteTemplates.from_routes(self._app.routes)
        return templates(scope)


class MetricsEndpoint:
    """The ``GET /metrics`` endpoint of one server (its bearer token is checked by the app before
    the endpoint runs); ``requests`` is the server's request-metrics middleware (``None`` when
    there is none)."""

    def __init__(
        self,
        store: LightningStore,
        requests: RequestMetrics | None,
        *,
        statistics_timeout: float = 10.0,
    ) -> None:
        self.store = store
        self.requests = requests
        self.statistics_timeout = statistics_timeout
        self._registry: CollectorRegistry | None = None
        self._collector = _StoreCollector(requests)

    def bind(self, requests: RequestMetrics | None) -> None:
        """Report the counters of ``requests`` (the server's middleware, made after this)."""
        self.requests = requests
        self._collector.requests = requests

    def registry(self) -> CollectorRegistry:
        """This server's registry (made, with the process collectors, on first use)."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

            registry = CollectorRegistry(auto_describe=False)
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
            registry.register(self._collector)
            self._registry = registry
        return self._registry

    async def endpoint(self, request: Request) -> Response:
        """``GET /metrics``."""
        if not metrics_available():
            raise HTTPError(
                501, "not_implemented", f"GET /metrics needs the prometheus_client package: {EXTRA}"
            )
        from prometheus_client.exposition import choose_encoder

        registry = self.registry()
        start = time.perf_counter()
        stats: dict[str, Any] | None
        try:
            with anyio.fail_after(self.statistics_timeout):
                stats = await self.store.statistics()
        except Exception as exc:  # the store is down: the scrape still answers, with agl_store_up 0
            logger.warning("GET /metrics: store.statistics() failed: %s: %s", type(exc).__name__, exc)
            stats = None
        self._collector.stats = stats
        self._collector.stats_seconds = time.perf_counter() - start
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        headers = {"Content-Type": content_type, "Cache-Control": "no-store"}
        return Response(encoder(registry), headers=headers)

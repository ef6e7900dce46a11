"""What a store server adds to be observed: the dashboard's and ``/metrics``' routes and the
request-metrics middleware, in one place so the server needs only two hook lines::

    observe = Observability(store, token=..., bearer_ok=..., port=..., metrics=True, dashboard=True)
    routes += observe.routes                 # when building the starlette application
    app = observe.wrap(app, routes)          # the ASGI application the server runs

The middleware is installed only when ``metrics`` is on and ``prometheus_client`` is importable
(nothing is counted that nobody can scrape). Shutdown: nothing here owns a task or a resource.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.routing import Route
from starlette.types import ASGIApp

from ..store.base import LightningStore
from .dashboard import Dashboard
from .metrics import MetricsEndpoint, metrics_available
from .request_metrics import RequestMetrics, RouteTemplates

__all__ = ["Observability"]


class Observability:
    """The dashboard (``GET /`` and ``/v1/dashboard/...``) and ``GET /metrics`` of one server."""

    def __init__(
        self,
        store: LightningStore,
        *,
        token: str | None,
        bearer_ok: Callable[[Request], bool],
        port: Callable[[], int],
        metrics: bool = True,
        dashboard: bool = True,
    ) -> None:
        self.routes: list[Route] = []
        self.requests: RequestMetrics | None = None
        self._count_requests = metrics and metrics_available()
        self.dashboard = Dashboard(store, token=token, bearer_ok=bearer_ok, port=port) if dashboard else None
        if self.dashboard is not None:
            self.routes += self.dashboard.routes()
        self.metrics = MetricsEndpoint(store, bearer_ok, None) if metrics else None
        if self.metrics is not None:
            self.routes.append(Route("/metrics", self.metrics.endpoint, methods=["GET"]))

    def wrap(self, app: ASGIApp, routes: Sequence[Any]) -> ASGIApp:
        """``app`` behind the request-metrics middleware (labelled by the templates of
        ``routes``, every route of the server), or ``app`` itself when metrics are off."""
        if not self._count_requests or self.metrics is None:
            return app
        self.requests = RequestMetrics(app, RouteTemplates.from_routes(routes))
        self.metrics.bind(self.requests)
        return self.requests

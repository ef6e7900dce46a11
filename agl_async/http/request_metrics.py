"""Request metrics: a pure ASGI middleware that counts requests and times them by route.

It keeps plain counters in memory and imports nothing beyond the standard library:
:mod:`agl_async.http.metrics` turns them into Prometheus metric families when ``/metrics`` is
scraped. On the request hot path it costs two clock reads, a dictionary lookup for the route and a
bisection into the latency buckets (see ``benchmarks/metrics_overhead.py`` for the measured cost).
No lock: the server runs on one event loop and nothing here awaits between a read and a write.

Routes are labelled by their template (``/v1/dashboard/rollouts/{rollout_id}``), never by the raw
path, so the number of series stays bounded whatever clients send; a path that matches no route is
labelled ``other``. A request that ends before any response started (the client went away, the
server was stopped and cancelled it) has ``status="none"``.

Cancellation: the middleware adds no await of its own; a cancelled request is still counted (in
a ``finally``) and the cancellation propagates unchanged.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["DEFAULT_BUCKETS", "Histogram", "RequestMetrics", "RouteTemplates"]

#: Upper bounds (seconds) of the latency buckets: from half a millisecond (an in-memory store call
#: on loopback) to a minute (long polls wait up to their timeout).
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
OTHER = "other"


class RouteTemplates:
    """Maps a request to the template of the route that serves it.

    ``exact`` are the paths without parameters (looked up in a dictionary); ``templated`` the
    starlette routes with path parameters (tried in order, only for paths not found exactly).
    """

    def __init__(self, exact: Iterable[str], templated: Sequence[Route] = ()) -> None:
        self.exact = {path: path for path in exact}
        self.templated = list(templated)

    @classmethod
    def from_routes(cls, routes: Iterable[Any]) -> RouteTemplates:
        exact: list[str] = []
        templated: list[Route] = []
        for route in routes:
            if isinstance(route, Route):
                (templated if route.param_convertors else exact).append(route)  # type: ignore[arg-type]
        return cls([r.path for r in exact], templated)  # type: ignore[attr-defined]

    def __call__(self, scope: Scope) -> str:
        path: str = scope["path"]
        found = self.exact.get(path)
        if found is not None:
            return found
        for route in self.templated:
            match, _ = route.matches(scope)
            if match is not Match.NONE:  # FULL, or PARTIAL (the path matched, the method did not)
                return route.path
        return OTHER


class Histogram:
    """Counts per latency bucket (not cumulative; the last one is ``+Inf``), their sum and count."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, count of observations <= le), ..., ("+Inf", count)]`` as Prometheus wants."""
        out: list[tuple[str, int]] = []
        total = 0
        for bound, n in zip(self.bounds, self.counts[:-1], strict=True):
            total += n
            out.append((_float_label(bound), total))
        out.append(("+Inf", total + self.counts[-1]))
        return out


def _float_label(value: float) -> str:
    return repr(float(value))


class _Route:
    """What has been counted for one (route, method): answers by status and a latency histogram."""

    __slots__ = ("latency", "statuses")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.statuses: dict[int | str, int] = {}
        self.latency = Histogram(bounds)


class RequestMetrics:
    """ASGI middleware around ``app``: requests by (route, method, status), latency by (route,
    method), requests in flight. ``resolve`` maps a scope to its route template
    (:class:`RouteTemplates`). Only ``http`` scopes are measured; others pass through."""

    def __init__(
        self,
        app: ASGIApp,
        resolve: Callable[[Scope], str],
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        self.app = app
        self.resolve = resolve
        self.buckets = tuple(sorted(buckets))
        self.routes: dict[tuple[str, str], _Route] = {}
        self.in_flight = 0

    @property
    def requests(self) -> dict[tuple[str, str, str], int]:
        """Requests answered, by (route, method, status)."""
        return {
            (route, method, str(status)): n
            for (route, method), entry in self.routes.items()
            for status, n in entry.statuses.items()
        }

    @property
    def latency(self) -> dict[tuple[str, str], Histogram]:
        """Latency histograms by (route, method)."""
        return {key: entry.latency for key, entry in self.routes.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | str = "none"

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = time.perf_counter()
        self.in_flight += 1
        try:
            await self.app(scope, receive, send_and_note_status)
        except Exception:
            if status == "none":
                status = 500  # what the ASGI server answers for an application error
            raise
        finally:
            elapsed = time.perf_counter() - start
            self.in_flight -= 1
            self.record(self.resolve(scope), scope["method"], status, elapsed)

    def record(self, route: str, method: str, status: int | str, seconds: float) -> None:
        """Count one finished request (also usable by code that answers outside ``app``)."""
        entry = self.routes.get((route, method))
        if entry is None:
            if method not in _METHODS:
                method = OTHER
            entry = self.routes.get((route, method))
            if entry is None:
                entry = self.routes[(route, method)] = _Route(self.buckets)
        statuses = entry.statuses
        statuses[status] = statuses.get(status, 0) + 1
        entry.latency.observe(seconds)

"""``GET /``: a live dashboard of the store, for a web browser.

The page (``static/index.html`` with its script, stylesheet and the vendored uPlot charting
library, all shipped inside the package; no build step) holds no data itself: it polls the JSON
routes below every few seconds while it is visible.

* ``GET /``: the page (``?token=T``: see "Token" below); ``GET /static/{name}``: its assets;
* ``POST /v1/dashboard/session``: ``{"token": T}`` -> the session cookie (204);
* ``GET /v1/dashboard/summary``: counts by status, queue, workers, timeline;
* ``GET /v1/dashboard/rollouts``: one page of rollouts, newest first: ``status``
  (comma-separated), ``q`` (id contains), ``limit`` (<= 500), ``offset``;
* ``GET /v1/dashboard/rollouts/{rollout_id}``: one rollout with its attempts and spans.

Every JSON route reads the store through the public store API with bounded work per request:
pages of rollouts (``query_rollouts(limit=, offset=)``), the timeline refreshed incrementally
(:mod:`agl_async.http.timeline`), at most :data:`MAX_WORKERS` workers and :data:`MAX_SPANS` spans.

Token
    With a token on the server, the JSON routes answer 401 unless the request carries the bearer
    token or the dashboard's session cookie; the page and its assets (which contain no store
    data) load anyway and show a "token required" state. Opening ``/?token=T`` with the right
    token sets the cookie (``HttpOnly``, ``SameSite=Strict``, ``Secure`` over HTTPS) and redirects
    to ``/``, so the token leaves the address bar; the page can also post a pasted token to
    ``/v1/dashboard/session``. The cookie holds an HMAC of the token, not the token: it opens the
    dashboard's read-only routes and nothing else. A wrong token redirects to ``/#token-rejected``.

Cancellation: every route is a plain request handler; a cancelled request changes nothing (the
only state, the timeline, is kept consistent as :mod:`agl_async.http.timeline` describes).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import importlib.resources
import math
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import msgspec
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ..store.base import LightningStore
from ..types import ROLLOUT_STATUSES, TERMINAL_ROLLOUT_STATUSES, Attempt, Rollout, Span, Worker, to_builtins
from . import protocol as p
from .app import Endpoint, HTTPError, StoreApp
from .timeline import TimelineSource, reward_of

__all__ = ["MAX_PAGE", "MAX_SPANS", "MAX_WORKERS", "Dashboard", "dashboard_url", "install"]

#: The most rollouts one page of ``/v1/dashboard/rollouts`` returns.
MAX_PAGE = 500
#: The most workers ``/v1/dashboard/summary`` lists (by most recent heartbeat); the count is exact.
MAX_WORKERS = 500
#: The most spans the rollout detail returns (the first ones by attempt and sequence id).
MAX_SPANS = 5000
#: A rollout's input larger than this (as JSON) is shown as a truncated preview.
MAX_INPUT_BYTES = 16 * 1024

_encoder = msgspec.json.Encoder()
_JSON = "application/json"
_SESSION_CONTEXT = b"agl-async dashboard session v1"

# Content Security Policy of the page: its own script, style and API only; no framing.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_DATA_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}


_TOKEN_REQUIRED = "the dashboard needs the server's token: open the ?token= link or send the bearer token"


class _BadRequest(Exception):
    pass


def _json(value: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(value), status, headers=_DATA_HEADERS, media_type=_JSON)


def _error(status: int, error: str, detail: str) -> Response:
    headers = dict(_DATA_HEADERS)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return Response(_encoder.encode(p.ErrorBody(error, detail)), status, headers=headers, media_type=_JSON)


@functools.cache
def _assets() -> Mapping[str, tuple[bytes, str, str]]:
    """The page's files by their path under ``static/``: (content, content type, ETag)."""
    root = importlib.resources.files("agl_async.http") / "static"
    out: dict[str, tuple[bytes, str, str]] = {}

    def walk(folder: Any, prefix: str) -> None:
        for entry in folder.iterdir():
            name = f"{prefix}{entry.name}"
            if entry.is_dir():
                walk(entry, f"{name}/")
                continue
            suffix = name[name.rfind(".") :] if "." in name else ""
            if suffix in _CONTENT_TYPES:
                content = entry.read_bytes()
                etag = '"' + hashlib.sha256(content).hexdigest()[:32] + '"'
                out[name] = (content, _CONTENT_TYPES[suffix], etag)

    walk(root, "")
    return out


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _BadRequest(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise _BadRequest(f"{name} must be in {low}..{high}, got {value}")
    return value


def _row(rollout: Rollout) -> dict[str, Any]:
    return {
        "rollout_id": rollout.rollout_id,
        "status": rollout.status,
        "mode": rollout.mode,
        "start_time": rollout.start_time,
        "end_time": rollout.end_time,
        "reward": reward_of(rollout),
        "resources_id": rollout.resources_id,
    }


def _worker(worker: Worker) -> dict[str, Any]:
    return {
        "worker_id": worker.worker_id,
        "status": worker.status,
        "last_heartbeat_time": worker.last_heartbeat_time,
        "last_dequeue_time": worker.last_dequeue_time,
        "current_rollout_id": worker.current_rollout_id,
        "current_attempt_id": worker.current_attempt_id,
        "heartbeat_stats": worker.heartbeat_stats,
    }


def _heartbeat(worker: Worker) -> float:
    seen = worker.last_heartbeat_time or worker.last_dequeue_time
    return seen if seen is not None else -math.inf


def _preview(value: Any) -> tuple[Any, bool]:
    """``value`` itself, or a truncated JSON text of it when it is larger than MAX_INPUT_BYTES."""
    try:
        encoded = _encoder.encode(value)
    except (TypeError, ValueError, OverflowError):
        return repr(value)[:MAX_INPUT_BYTES], True
    if len(encoded) <= MAX_INPUT_BYTES:
        return value, False
    return encoded[:MAX_INPUT_BYTES].decode("utf-8", "replace") + " …", True


def dashboard_url(endpoint: str, token: str | None) -> str:
    """The link that opens the dashboard of the server at ``endpoint``: with ``?token=`` when the
    server has a token (opening it sets the session cookie). It contains the token: print it for
    the user who started the server, never log it."""
    base = endpoint.rstrip("/") + "/"
    return f"{base}?token={quote(token, safe='')}" if token else base


def install(app: StoreApp) -> None:
    """Serve the dashboard on ``app`` (a row of the server's ``APP_EXTENSIONS``); nothing with
    ``LightningStoreServer(..., dashboard=False)``. The routes check their own credentials (the
    bearer token or the session cookie, see "Token" above). Keeps the :class:`Dashboard` in
    ``app.extensions["dashboard"]``. Nothing here owns a task or a resource."""
    if not app.options.get("dashboard", True):
        return

    def bearer_ok(request: Request) -> bool:
        try:
            app.check_auth(request)
        except HTTPError:
            return False
        return True

    dashboard = Dashboard(app.store, token=app.auth_token, bearer_ok=bearer_ok)
    app.extensions["dashboard"] = dashboard
    for path, endpoint, methods in dashboard.routes():
        app.add_route(path, endpoint, methods=methods, auth=False)


class Dashboard:
    """The dashboard's routes for one server.

    ``token`` is the server's bearer token (``None``: no authentication); ``bearer_ok(request)``
    is the server's check of the ``Authorization`` header. The session cookie is named after the
    port the request reached (the server's bound port), so that dashboards of servers on other
    ports of the same host keep their own cookies.
    """

    def __init__(
        self,
        store: LightningStore,
        *,
        token: str | None,
        bearer_ok: Callable[[Request], bool],
    ) -> None:
        self.store = store
        self.token = token
        self.bearer_ok = bearer_ok
        self.timeline = TimelineSource(store)
        self.statistics_ttl = 1.0
        self._statistics: tuple[float, dict[str, Any]] | None = None
        self._session = (
            hmac.new(token.encode(), _SESSION_CONTEXT, hashlib.sha256).hexdigest() if token else None
        )

    def routes(self) -> list[tuple[str, Endpoint, tuple[str, ...]]]:
        """``(path, endpoint, methods)`` of every route, for ``app.add_route``."""
        return [
            ("/", self.page, ("GET",)),
            ("/static/{name:path}", self.asset, ("GET",)),
            (f"{p.API_PREFIX}/dashboard/session", self.session, ("POST",)),
            (f"{p.API_PREFIX}/dashboard/summary", self._data(self.summary), ("GET",)),
            (f"{p.API_PREFIX}/dashboard/rollouts", self._data(self.rollouts), ("GET",)),
            (f"{p.API_PREFIX}/dashboard/rollouts/{{rollout_id}}", self._data(self.rollout), ("GET",)),
        ]

    # ------------------------------------------------------------------ authentication
    @staticmethod
    def cookie_name(request: Request) -> str:
        """The session cookie's name: per port of the server the request reached."""
        server = request.scope.get("server")
        port = server[1] if server and server[1] is not None else request.url.port
        return f"agl_dashboard_{port}"

    def _token_ok(self, given: str) -> bool:
        return self.token is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def authorized(self, request: Request) -> bool:
        """No token on the server, the bearer token, or the session cookie."""
        if self._session is None:
            return True
        cookie = request.cookies.get(self.cookie_name(request))
        if cookie is not None and hmac.compare_digest(cookie.encode(), self._session.encode()):
            return True
        return self.bearer_ok(request)

    def _with_cookie(self, response: Response, request: Request) -> Response:
        assert self._session is not None
        response.set_cookie(
            self.cookie_name(request),
            self._session,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    def _data(self, handler: Callable[[Request], Any]) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            if not self.authorized(request):
                return _error(401, "unauthorized", _TOKEN_REQUIRED)
            try:
                return await handler(request)  # type: ignore[no-any-return]
            except (_BadRequest, ValueError) as exc:
                return _error(400, "bad_request", str(exc))

        endpoint.__name__ = handler.__name__
        return endpoint

    # ------------------------------------------------------------------ page and assets
    async def page(self, request: Request) -> Response:
        given = request.query_params.get("token")
        if given is not None:
            if self._session is None:
                return RedirectResponse("./", 303, headers=_PAGE_HEADERS)
            if self._token_ok(given):
                return self._with_cookie(RedirectResponse("./", 303, headers=_PAGE_HEADERS), request)
            return RedirectResponse("./#token-rejected", 303, headers=_PAGE_HEADERS)
        content, content_type, _ = _assets()["index.html"]
        return Response(content, headers=_PAGE_HEADERS, media_type=content_type)

    async def asset(self, request: Request) -> Response:
        found = _assets().get(request.path_params["name"])
        if found is None or request.path_params["name"] == "index.html":
            return _error(404, "not_found", f"no dashboard asset {request.path_params['name']!r}")
        content, content_type, etag = found
        headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(content, headers=headers, media_type=content_type)

    async def session(self, request: Request) -> Response:
        """``POST {"token": T}``: the session cookie for a pasted token (204), else 401."""
        if request.headers.get("content-type", "").split(";")[0].strip() != _JSON:
            return _error(415, "unsupported_media_type", "send the token as application/json")
        body = await request.body()
        if len(body) > 4096:
            return _error(413, "payload_too_large", "the session request is limited to 4096 bytes")
        try:
            given = msgspec.json.decode(body, type=dict[str, str]).get("token", "")
        except msgspec.DecodeError:
            return _error(400, "bad_request", 'expected {"token": "..."}')
        if self._session is None:
            return Response(status_code=204, headers=_DATA_HEADERS)
        if not self._token_ok(given):
            return _error(401, "unauthorized", "wrong token")
        return self._with_cookie(Response(status_code=204, headers=_DATA_HEADERS), request)

    # ------------------------------------------------------------------ data
    async def statistics(self) -> dict[str, Any]:
        """``store.statistics()``, reused for ``statistics_ttl`` seconds: a page polls the summary
        and the rollouts together, and several pages may be open (on an in-memory store of
        100,000 rollouts one call costs about 20-30 ms)."""
        now = time.monotonic()
        if self._statistics is not None and now - self._statistics[0] < self.statistics_ttl:
            return self._statistics[1]
        stats = await self.store.statistics()
        self._statistics = (time.monotonic(), stats)
        return stats

    async def summary(self, request: Request) -> Response:
        stats = await self.statistics()
        finished = sum(int((stats.get("rollouts") or {}).get(s, 0)) for s in TERMINAL_ROLLOUT_STATUSES)
        timeline = await self.timeline.get(finished)
        workers = await self.store.query_workers()
        workers.sort(key=_heartbeat, reverse=True)
        head = await self.store.query_rollouts(status_in=["queuing", "requeuing"], limit=10)
        return _json(
            {
                "now": time.time(),
                "statistics": stats,
                "workers": [_worker(w) for w in workers[:MAX_WORKERS]],
                "workers_total": len(workers),
                "queue": {"length": stats.get("queue_length"), "oldest": [_row(r) for r in head]},
                "timeline": timeline,
            }
        )

    async def rollouts(self, request: Request) -> Response:
        raw_status = request.query_params.get("status", "")
        statuses = [s for s in raw_status.split(",") if s] or None
        for status in statuses or ():
            if status not in ROLLOUT_STATUSES:
                expected = sorted(ROLLOUT_STATUSES)
                raise _BadRequest(f"unknown rollout status {status!r}; expected one of {expected}")
        search = request.query_params.get("q", "").strip() or None
        limit = _query_int(request, "limit", 50, 1, MAX_PAGE)
        offset = _query_int(request, "offset", 0, 0, 2**62)
        page = await self.store.query_rollouts(
            status_in=statuses,  # type: ignore[arg-type]
            rollout_id_contains=search,
            sort_by="start_time",
            sort_order="desc",
            limit=limit + 1,  # one more: is there a next page?
            offset=offset,
        )
        total: int | None = None
        if search is None:  # exact from the store's counts; a search has no count (only "more")
            stats = await self.statistics()
            counts = stats.get("rollouts") or {}
            total = (
                int(stats.get("total_rollouts", 0))
                if statuses is None
                else sum(int(counts.get(s, 0)) for s in statuses)
            )
        return _json(
            {
                "items": [_row(r) for r in page[:limit]],
                "offset": offset,
                "limit": limit,
                "has_more": len(page) > limit,
                "total": total,
            }
        )

    async def rollout(self, request: Request) -> Response:
        rollout_id = request.path_params["rollout_id"]
        rollout = await self.store.get_rollout_by_id(rollout_id)
        if rollout is None:
            return _error(404, "not_found", f"rollout {rollout_id!r} not found")
        attempts: list[Attempt] = await self.store.query_attempts(rollout_id)
        spans: list[Span] = await self.store.query_spans(rollout_id)
        detail = to_builtins(rollout)
        detail["input"], detail["input_truncated"] = _preview(rollout.input)
        detail["reward"] = reward_of(rollout)
        return _json(
            {
                "rollout": detail,
                "attempts": to_builtins(attempts),
                "spans": to_builtins(spans[:MAX_SPANS]),
                "spans_total": len(spans),
            }
        )

"""The store server's ASGI application: the store routes, their errors, auth, and room for more.

:class:`StoreApp` answers

* one ``POST /v1/<method>`` per row of :data:`~agl_async.http.protocol.ROUTES`: the body is decoded
  and validated against the row's struct, and the store method of the same name is called with its
  fields; only the routes marked ``special`` (long polls, ``add_span``) have handlers of their own;
* ``GET /v1/health`` (never authenticated) and ``GET /v1/openapi.json``;
* every route added with :meth:`StoreApp.add_route`.

Errors take one path. An endpoint raises :class:`HTTPError` (status, snake_case kind, detail); a
store ``ValueError`` is a 400 ``value_error``; anything else is a bug, logged with its traceback and
answered 500 ``internal_error`` (a ``RecursionError`` — a body nested deeper than the decoder
goes — is the request's fault: 400 ``malformed_json``). Every error is the JSON body
``{"error": kind, "detail": message}`` (:class:`~agl_async.http.protocol.ErrorBody`). The kinds:
``malformed_json``, ``bad_request``, ``client_disconnected``, ``value_error`` (400);
``unauthorized`` (401); ``not_found`` (404); ``method_not_allowed`` (405); ``payload_too_large``
(413); ``validation_error``, ``idempotency_key_reused`` (422); ``internal_error`` (500).

Adding a route that is not a store method (e.g. ``POST /v1/traces``, ``GET /metrics``, a dashboard)::

    async def metrics(request: Request) -> Response:
        body = await app.read_body(request)   # the body limit (413), when it takes a body
        ...                                    # raise HTTPError(400, "bad_request", "...") on bad input
        return Response(...)

    app.add_route("/metrics", metrics, methods=("GET",))  # auth=True: the bearer token is checked first

and a middleware (an ASGI app factory, e.g. request metrics) with ``app.add_middleware(factory)``; it
wraps every request, store routes included. Both are done before the server starts; a module that
provides a feature exposes an ``install(app)`` function and is named in the server's
:data:`~agl_async.http.server.APP_EXTENSIONS`. What an extension may read: ``app.store``,
``app.auth_token`` (the server's token, ``None`` without one), ``app.options`` (the server's
per-server settings of its extensions, e.g. ``metrics=`` and ``dashboard=``: a feature turned off
there installs nothing) and ``app.routes`` (every route served, for labelling requests by route);
it may keep its per-server objects in ``app.extensions[name]`` for inspection.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import anyio
import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.routing import Route as StarletteRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from .._validate import check_seconds
from ..store.base import LightningStore
from ..types import WorkerId
from . import protocol as p
from ._idempotency import IdempotencyCache, IdempotencyKeyReused, fingerprint

__all__ = ["JSON", "RUN_OVER", "Endpoint", "HTTPError", "StoreApp"]

logger = logging.getLogger("agl_async")

JSON = "application/json"
_MAX_KEY_LENGTH = 200
_encoder = msgspec.json.Encoder()


def _always(status: int) -> bool:
    return True


#: What a dequeue route's handler returns once the run is over (answered ``204 No Content``).
RUN_OVER: Any = object()

#: A route's handler: a request in, a response out (or :class:`HTTPError` raised).
Endpoint = Callable[[Request], Awaitable[Response]]
_Handler = Callable[[Any, Request], Awaitable[Any]]


class HTTPError(Exception):
    """Raised by an endpoint to answer with an error: HTTP ``status``, a snake_case ``kind``, a
    ``detail`` for humans, and optional response ``headers``."""

    def __init__(self, status: int, kind: str, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail, self.headers = status, kind, detail, headers

    def body(self) -> bytes:
        return _encoder.encode(p.ErrorBody(self.kind, self.detail))

    def response(self) -> Response:
        return Response(self.body(), self.status, headers=self.headers, media_type=JSON)


def _error_of(exc: Exception, where: str) -> HTTPError:
    """The one mapping from an exception to the error answered for it."""
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, (ValueError, TypeError, OverflowError)):  # bad input, as the store judged it
        return HTTPError(400, "value_error", str(exc))
    if isinstance(exc, ClientDisconnect):  # gone before its body arrived: nothing was applied
        return HTTPError(400, "client_disconnected", "incomplete request body")
    if isinstance(exc, RecursionError):  # a body nested deeper than the decoder goes
        return HTTPError(400, "malformed_json", f"JSON nested too deeply: {exc}")
    logger.error("LightningStoreServer: unexpected error in %s", where, exc_info=exc)
    return HTTPError(500, "internal_error", f"{type(exc).__name__}: {exc}")


class StoreApp:
    """The ASGI application of a :class:`~agl_async.http.server.LightningStoreServer`.

    Store routes go straight to their endpoint (skipping starlette's middleware stack and linear
    route matching: about 30 µs less per request); everything else goes through a starlette
    application that answers unknown paths and wrong methods with the same JSON errors.
    """

    def __init__(
        self,
        store: LightningStore,
        *,
        auth_token: str | None,
        max_body_bytes: int,
        idempotency: IdempotencyCache,
        openapi: bytes,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.store = store
        self.auth_token = auth_token or None
        self.max_body_bytes = max_body_bytes
        #: Per-server settings of the extensions (see the module docstring).
        self.options: dict[str, Any] = dict(options or {})
        #: What installed extensions keep for this application, by name (for inspection).
        self.extensions: dict[str, Any] = {}
        self._auth_header = f"Bearer {auth_token}".encode() if auth_token else None
        self._idempotency = idempotency
        self._openapi = openapi
        self._closing: anyio.Event | None = None
        self._run_over_headers: dict[str, str] | None = None  # set by end_run()
        self._endpoints: dict[str, Endpoint] = {
            spec.path: self._store_endpoint(spec) for spec in p.ROUTES.values()
        }
        self._starlette = Starlette(
            routes=[
                StarletteRoute(f"{p.API_PREFIX}/health", self._health, methods=["GET"]),
                self._route(f"{p.API_PREFIX}/openapi.json", self._openapi_route, ("GET",), auth=True),
                *(StarletteRoute(path, fn, methods=["POST"]) for path, fn in self._endpoints.items()),
            ],
            exception_handlers={HTTPException: self._starlette_error, Exception: self._unexpected},
        )
        self._asgi: ASGIApp = self._dispatch

    # ------------------------------------------------------------------ extension points
    def add_route(
        self, path: str, endpoint: Endpoint, *, methods: Sequence[str] = ("GET",), auth: bool = True
    ) -> None:
        """Serve ``endpoint`` at ``path`` (see the module docstring). With ``auth`` the bearer token
        is checked before the endpoint runs; :class:`HTTPError` and any other exception take the
        one error path."""
        self._starlette.router.routes.append(self._route(path, endpoint, methods, auth=auth))

    @property
    def routes(self) -> list[BaseRoute]:
        """Every route served (store routes, health, OpenAPI, added routes), in matching order."""
        return list(self._starlette.router.routes)

    def add_middleware(self, middleware: Callable[[ASGIApp], ASGIApp]) -> None:
        """Wrap the whole application (store routes included) in ``middleware(app)``."""
        self._asgi = middleware(self._asgi)

    def check_auth(self, request: Request) -> None:
        """Raise the 401 :class:`HTTPError` unless the request carries the server's bearer token."""
        if self._auth_header is None:
            return
        given = request.headers.get("authorization")
        if given is None or not hmac.compare_digest(given.encode(), self._auth_header):
            raise HTTPError(
                401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
            )

    async def read_body(self, request: Request) -> bytes:
        """The request body, or the 413 :class:`HTTPError` once it exceeds ``max_body_bytes``."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise HTTPError(400, "bad_request", f"invalid Content-Length {declared!r}") from None
            if size > limit:
                raise HTTPError(
                    413, "payload_too_large", f"request body of {size} bytes exceeds the limit of {limit}"
                )
        chunks = []
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise HTTPError(413, "payload_too_large", f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    # ------------------------------------------------------------------ serving state
    def open(self) -> None:
        """The server starts serving: long polls may wait (until :meth:`end_long_polls`)."""
        self._closing = anyio.Event()

    def end_run(self) -> None:
        """The run this server serves is over: long polls end now, no rollout is claimed any more
        (``dequeue_rollout`` / ``finish_and_dequeue`` answer ``204 No Content``: the attempt of a
        ``finish_and_dequeue`` is still recorded), and every store route's answer carries
        :data:`~agl_async.http.protocol.RUN_OVER_HEADER`; so that connected runners stop (exit 0)
        instead of finding the server gone later."""
        self._run_over_headers = {p.RUN_OVER_HEADER: "1"}
        self.end_long_polls()

    @property
    def run_over(self) -> bool:
        return self._run_over_headers is not None

    def end_long_polls(self) -> None:
        """Answer long polls at once from now on: the ones waiting end with a last non-blocking
        look, later ones do not wait."""
        if self._closing is not None:
            self._closing.set()

    # ------------------------------------------------------------------ ASGI
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._asgi(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self._endpoints.get(scope["path"])
            if endpoint is not None:
                try:
                    response = await endpoint(Request(scope, receive))
                except Exception as exc:
                    response = _error_of(exc, scope["path"]).response()
                await response(scope, receive, send)
                return
        await self._starlette(scope, receive, send)

    def _route(self, path: str, endpoint: Endpoint, methods: Sequence[str], *, auth: bool) -> StarletteRoute:
        async def guarded(request: Request) -> Response:
            try:
                if auth:
                    self.check_auth(request)
                return await endpoint(request)
            except Exception as exc:
                return _error_of(exc, path).response()

        guarded.__name__ = getattr(endpoint, "__name__", "endpoint")
        return StarletteRoute(path, guarded, methods=list(methods))

    async def _health(self, request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type=JSON)

    async def _openapi_route(self, request: Request) -> Response:
        return Response(self._openapi, media_type=JSON)

    async def _starlette_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        detail = f"{request.method} {request.url.path}: {exc.detail}"
        return HTTPError(exc.status_code, kind, detail, exc.headers).response()

    async def _unexpected(self, request: Request, exc: Exception) -> Response:
        return _error_of(exc, request.url.path).response()

    # ------------------------------------------------------------------ store routes
    def _store_endpoint(self, spec: p.Route[Any]) -> Endpoint:
        decoder = msgspec.json.Decoder(spec.body)
        handler = self._special(spec.name) if spec.special else self._generic(spec.name)
        cache = self._idempotency

        async def run(body: bytes, request: Request) -> tuple[int, bytes]:
            try:
                try:
                    args = decoder.decode(body or b"{}")
                except msgspec.ValidationError as exc:
                    raise HTTPError(422, "validation_error", str(exc)) from None
                except msgspec.DecodeError as exc:
                    raise HTTPError(400, "malformed_json", f"malformed JSON: {exc}") from None
                result = await handler(args, request)
                if result is RUN_OVER:  # a dequeue once the run is over: nothing claimed, and said so
                    return 204, b""
                return 200, _encoder.encode(result)
            except Exception as exc:
                error = _error_of(exc, spec.path)
                return error.status, error.body()

        async def endpoint(request: Request) -> Response:
            if self._auth_header is not None:
                self.check_auth(request)
            key = request.headers.get(p.IDEMPOTENCY_HEADER) if spec.mutating else None
            if key and len(key) > _MAX_KEY_LENGTH:
                detail = f"{p.IDEMPOTENCY_HEADER} longer than {_MAX_KEY_LENGTH} characters"
                raise HTTPError(400, "bad_request", detail)
            # Read (within the limit: 413) before any remembered answer may be replayed.
            body = await self.read_body(request)
            if not key:
                status, content = await run(body, request)
                return Response(content, status, media_type=JSON, headers=self._run_over_headers)
            try:
                status, content, replayed = await cache.answer(
                    key, fingerprint("POST", spec.path, body), lambda: run(body, request), keep=_always
                )
            except IdempotencyKeyReused as exc:
                raise HTTPError(422, "idempotency_key_reused", str(exc)) from None
            headers = {"idempotent-replayed": "true"} if replayed else None
            if self._run_over_headers is not None:
                headers = {**(headers or {}), **self._run_over_headers}
            return Response(content, status, media_type=JSON, headers=headers)

        endpoint.__name__ = spec.name
        return endpoint

    def _generic(self, name: str) -> _Handler:
        """Call the store method ``name`` with the decoded body's fields as keyword arguments."""
        method = getattr(self.store, name)
        asdict = msgspec.structs.asdict

        async def handler(args: Any, request: Request) -> Any:
            return await method(**asdict(args))

        return handler

    def _special(self, name: str) -> _Handler:
        s = self.store

        async def add_span(span: Any, request: Request) -> Any:
            return await s.add_span(span)

        async def dequeue_rollout(a: Any, request: Request) -> Any:
            return await self._dequeue(request, a.worker_id, a.timeout)

        async def finish_and_dequeue(a: Any, request: Request) -> Any:
            # The two steps of LightningStore.finish_and_dequeue, so that only the dequeue's wait
            # is interrupted when the server stops (the update is never applied twice).
            check_seconds(a.timeout)
            await s.update_attempt(a.rollout_id, a.attempt_id, status=a.status)
            return await self._dequeue(request, a.worker_id, a.timeout)

        async def wait_for_rollouts(a: Any, request: Request) -> Any:
            if a.timeout == 0:
                return await s.wait_for_rollouts(rollout_ids=a.rollout_ids, timeout=0)
            return await self._long_poll(
                request,
                lambda: s.wait_for_rollouts(rollout_ids=a.rollout_ids, timeout=a.timeout),
                lambda: s.wait_for_rollouts(rollout_ids=a.rollout_ids, timeout=0),
            )

        handlers: dict[str, _Handler] = {
            "add_span": add_span,
            "dequeue_rollout": dequeue_rollout,
            "finish_and_dequeue": finish_and_dequeue,
            "wait_for_rollouts": wait_for_rollouts,
        }
        return handlers[name]

    async def _dequeue(self, request: Request, worker_id: WorkerId | None, timeout: float | None) -> Any:
        s = self.store
        check_seconds(timeout)
        if self.run_over:  # nothing is handed out once the run is over: 204, see end_run()
            return RUN_OVER
        claimed = await s.dequeue_rollout(worker_id, timeout=0 if timeout else timeout)
        if claimed is not None or not timeout:
            return claimed

        async def look() -> Any:  # the last look of a poll ended early: none once the run is over
            return RUN_OVER if self.run_over else await s.dequeue_rollout(worker_id)

        claimed = await self._long_poll(request, lambda: s.dequeue_rollout(worker_id, timeout=timeout), look)
        if claimed is RUN_OVER or (claimed is None and self.run_over):
            return RUN_OVER
        if claimed is not None and await request.is_disconnected():
            # The claim landed as its client left: nobody would run it. Put it back at the head
            # of the queue rather than leave it "preparing" until a watchdog notices.
            if await s.unclaim_rollout(claimed.rollout_id, claimed.attempt.attempt_id):
                logger.info("client left during a long poll; rollout %s put back", claimed.rollout_id)
                return None
        return claimed

    async def _long_poll(
        self,
        request: Request,
        wait: Callable[[], Awaitable[Any]],
        look: Callable[[], Awaitable[Any]],
    ) -> Any:
        """Run a blocking call (``wait``), ending it early when the server stops or the client
        disconnects; then answer with ``look()`` (the same call with ``timeout=0``). The store's
        waits are side-effect free until they return, so an interrupted wait claimed nothing."""
        closing = self._closing
        if closing is None or closing.is_set():
            return await look()
        result: Any = None
        error: Exception | None = None
        finished = False
        disconnected = False
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                nonlocal disconnected
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                disconnected = True
                tg.cancel_scope.cancel()

            async def watch_closing() -> None:
                await closing.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(watch_disconnect)
            tg.start_soon(watch_closing)
            try:
                result = await wait()
            except Exception as exc:  # re-raised below, outside the task group (no ExceptionGroup)
                error = exc
            finished = True
            tg.cancel_scope.cancel()
        if error is not None:
            raise error
        if finished:
            return result
        # Interrupted. A client that went away gets nothing claimed for it; on server stop the
        # (still connected) client gets one last non-blocking look.
        return None if disconnected else await look()

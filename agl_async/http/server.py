"""``LightningStoreServer``: serve a store over HTTP from inside the caller's event loop.

The server is a starlette application run by uvicorn as a task of the caller's (asyncio) event
loop: no thread, no subprocess. It is also a ``LightningStore`` itself: calls made on it in its
own process go straight to the wrapped store.

Lifecycle
    ``await start()`` binds the socket itself (so "address in use" is an immediate ``OSError``
    naming host:port, raised before anything else starts) and returns once the socket accepts
    connections. ``await stop()`` stops accepting, ends the long polls in progress (a waiting
    ``dequeue_rollout`` answers ``None``, a waiting ``wait_for_rollouts`` answers what has finished
    so far), lets requests in flight finish for up to ``graceful_timeout`` seconds, then cancels
    the rest; when it returns no task of the server is left. Cancelling ``stop()`` cancels the
    server task outright. ``async with server:`` does both.

Signals
    uvicorn normally installs SIGINT/SIGTERM handlers while it serves. The embedded server does
    not: a Ctrl-C reaches the host application exactly as if no server were running.

Wire protocol and errors
    One ``POST /v1/<method>`` per store method (see :mod:`agl_async.http.protocol`), plus
    ``GET /v1/health`` (never authenticated) and ``GET /v1/openapi.json``. Every error is a JSON body
    ``{"error": kind, "detail": message}``: 400 for malformed JSON and for the store's
    ``ValueError`` (the client re-raises it as ``ValueError`` with the same message), 401 for a
    missing/wrong bearer token, 404 unknown route, 405 wrong method, 413 body over
    ``max_body_bytes``, 422 a body that does not match the route's schema. A failing request never
    stops the server.

Idempotency
    A mutating request may carry an ``Idempotency-Key`` header. The server remembers the answers
    to the last ``idempotency_cache_size`` keys (within ``idempotency_cache_bytes``); a retry with
    a known key gets the remembered answer (and a retry arriving while the first is still running
    waits for it) instead of the change being applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import ipaddress
import logging
import os
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Generator, Mapping
from types import TracebackType
from typing import Any

import anyio
import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..store.base import UNSET, EnqueueRolloutRequest, LightningStore
from ..store.delegation import delegate
from ..types import Span, WorkerId
from . import protocol as p

__all__ = ["DEFAULT_MAX_BODY_BYTES", "LightningStoreServer"]

logger = logging.getLogger("agl_async")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
_MAX_KEY_LENGTH = 200
_JSON = "application/json"
_encoder = msgspec.json.Encoder()


class _HTTPError(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def _error_response(
    status: int, error: str, detail: str, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(_encoder.encode(p.ErrorBody(error, detail)), status, headers=headers, media_type=_JSON)


def _u(value: Any) -> Any:
    """msgspec's "absent" marker -> the store's ``UNSET``."""
    return UNSET if value is msgspec.UNSET else value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn's Server minus signal capture, plus an event set once startup has finished, and
    ``should_exit`` backed by an event: uvicorn's own main loop looks at the flag every 0.1 s, this
    one wakes as soon as it is set (a stop is 50 ms quicker on average, 100 ms at worst:
    ``benchmarks/report.py`` figure 3)."""

    def __init__(self, config: uvicorn.Config) -> None:
        self._exit = asyncio.Event()  # before super().__init__, which assigns should_exit
        super().__init__(config)
        self.startup_done = asyncio.Event()

    @property
    def should_exit(self) -> bool:
        return self._exit.is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value:
            self._exit.set()
        else:
            self._exit.clear()

    async def main_loop(self) -> None:
        await self.on_tick(0)  # sets the default headers, as uvicorn's loop does first
        await self._exit.wait()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Leave SIGINT/SIGTERM to the host application.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            self.startup_done.set()


class _IdempotencyCache:
    """Answers of the most recent mutating requests by key (at most ``size`` of them and
    ``max_bytes`` of answers, oldest evicted first), and the keys being answered right now.

    Retries come within the client's retry budget (seconds), so a bounded recent window is all
    that is needed; an answer larger than a quarter of ``max_bytes`` is not kept."""

    def __init__(self, size: int, max_bytes: int) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0
        self.done: OrderedDict[str, tuple[int, bytes]] = OrderedDict()
        self.running: dict[str, anyio.Event] = {}

    def remember(self, key: str, status: int, body: bytes) -> None:
        if self.size <= 0 or len(body) > self.max_bytes // 4:
            return
        self.done[key] = (status, body)
        self.bytes += len(body)
        while len(self.done) > self.size or self.bytes > self.max_bytes:
            _, (_, evicted) = self.done.popitem(last=False)
            self.bytes -= len(evicted)


_Handler = Callable[[Any, Request], Awaitable[Any]]
_Endpoint = Callable[[Request], Awaitable[Response]]


class _StoreApp:
    """The ASGI entry point: a store route (``POST /v1/<method>``) goes straight to its endpoint,
    skipping starlette's middleware stack and linear route matching (about 30 µs less per
    request, measured); everything else (health, OpenAPI, unknown paths, wrong methods) goes
    through the starlette application, which answers it with the same JSON errors."""

    def __init__(
        self, app: Starlette, endpoints: dict[str, _Endpoint], on_error: Callable[[str, Exception], Response]
    ) -> None:
        self.app = app
        self.endpoints = endpoints
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.endpoints.get(scope["path"])
            if endpoint is not None:
                try:
                    response = await endpoint(Request(scope, receive))
                except Exception as exc:
                    response = self.on_error(scope["path"], exc)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class LightningStoreServer(LightningStore):
    """Serve ``store`` over HTTP on ``host:port`` (``port=0``: a free port, see :attr:`port`).

    ``auth_token`` (default: env ``AGL_SERVER_TOKEN``; ``""`` disables) makes every route but
    health require ``Authorization: Bearer <token>``. Binding a non-loopback address without a
    token logs a warning on the ``agl_async`` logger. Bodies over ``max_body_bytes`` get a 413.
    """

    def __init__(
        self,
        store: LightningStore,
        host: str = "localhost",
        port: int = 4747,
        *,
        auth_token: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        graceful_timeout: float = 5.0,
        idempotency_cache_size: int = 8192,
        idempotency_cache_bytes: int = 64 * 1024 * 1024,
        log_level: str = "warning",
    ) -> None:
        if not isinstance(store, LightningStore):
            raise TypeError(f"LightningStoreServer serves a LightningStore, got {type(store).__name__}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an integer in 0..65535, got {port!r}")
        if max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes!r}")
        self.store = store
        self.host = host
        self._requested_port = port
        self._bound_port: int | None = None
        if auth_token is None:
            auth_token = os.environ.get("AGL_SERVER_TOKEN") or None
        self.auth_token = auth_token or None
        self._auth_header = f"Bearer {self.auth_token}".encode() if self.auth_token else None
        self.max_body_bytes = max_body_bytes
        self.graceful_timeout = graceful_timeout
        self.log_level = log_level
        self._idempotency = _IdempotencyCache(idempotency_cache_size, idempotency_cache_bytes)
        self._server: _EmbeddedUvicorn | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing: anyio.Event | None = None
        self._openapi = _openapi_bytes()
        if not _is_loopback(host) and not self.auth_token:
            logger.warning(
                "LightningStoreServer binds %s (not a loopback address) without an auth token: anyone who "
                "can reach port %s can read and change the store; pass auth_token= or set AGL_SERVER_TOKEN",
                host,
                port,
            )
        self.app = self._build_app()

    def __repr__(self) -> str:
        return f"LightningStoreServer({self.store!r}, endpoint={self.endpoint!r})"

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(
            "LightningStoreServer does not pickle (it owns a socket); hand child processes a "
            "LightningStoreClient(server.endpoint) instead"
        )

    # ------------------------------------------------------------------ addresses
    @property
    def port(self) -> int:
        """The bound port once started (the real one when created with ``port=0``)."""
        return self._bound_port if self._bound_port is not None else self._requested_port

    @property
    def endpoint(self) -> str:
        """Base URL for ``LightningStoreClient`` (``localhost`` is reported as ``127.0.0.1``)."""
        host = "127.0.0.1" if self.host in ("localhost", "") else self.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def started(self) -> bool:
        return self._task is not None

    # ------------------------------------------------------------------ lifecycle
    def _bind(self) -> socket.socket:
        host = "127.0.0.1" if self.host == "localhost" else self.host
        where = f"{self.host}:{self._requested_port}"
        try:
            infos = socket.getaddrinfo(
                host, self._requested_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as exc:
            raise OSError(f"cannot bind LightningStoreServer to {where}: {exc}") from exc
        family, type_, proto, _, address = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(2048)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot bind LightningStoreServer to {where}: {exc.strerror}") from exc
        self._bound_port = sock.getsockname()[1]
        return sock

    async def start(self) -> None:
        """Bind, start serving as a task of the running loop, return once connections are accepted.

        Raises ``OSError`` naming host:port when the address cannot be bound (e.g. in use), and
        ``RuntimeError`` when already started. Cancelling ``start()`` leaves nothing running.
        """
        if self._task is not None:
            raise RuntimeError(f"{self!r} is already started")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "LightningStoreServer runs on asyncio (uvicorn): start it on an asyncio loop"
            ) from None
        sock = self._bind()
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_level=self.log_level,
            log_config=None,  # an embedded server leaves the host's logging configuration alone
            access_log=False,
            http=_http_protocol(),  # [corked writes hook] agl_async/http/_corked.py
            timeout_keep_alive=60,  # longer than httpx's 5 s idle expiry: the client closes first
            timeout_graceful_shutdown=self.graceful_timeout,  # type: ignore[arg-type]  # float works
            server_header=False,
            date_header=False,
        )
        server = _EmbeddedUvicorn(config)
        self._server, self._closing = server, anyio.Event()
        self._task = loop.create_task(
            server.serve(sockets=[sock]), name=f"LightningStoreServer {self.endpoint}"
        )
        try:
            ready = asyncio.ensure_future(server.startup_done.wait())
            try:
                await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ready.cancel()
            if not server.started:
                task = self._task
                self._task = self._server = None
                sock.close()
                await task  # re-raises the startup error
                raise RuntimeError(f"LightningStoreServer at {self.endpoint} did not start")
        except BaseException:
            if self._task is not None:
                await self._abort()
            raise
        logger.info("LightningStoreServer serving %s at %s", type(self.store).__name__, self.endpoint)

    async def _abort(self) -> None:
        task, server = self._task, self._server
        self._task = self._server = None
        if task is None:
            return
        if server is not None:
            server.should_exit = server.force_exit = True
        task.cancel()
        with contextlib.suppress(BaseException):
            await task

    def end_long_polls(self) -> None:
        """Answer long polls at once from now on, while still serving: the ones waiting end with a
        last non-blocking look, later ones do not wait. For the end of a run (the client-server
        strategy calls it when the algorithm returns), so that idle runners see the stop event
        without waiting out their poll; ``stop()`` does it first too. A no-op when not started."""
        if self._closing is not None:
            self._closing.set()

    async def stop(self) -> None:
        """Stop gracefully (see the module docstring); a no-op when not started."""
        task, server = self._task, self._server
        if task is None or server is None:
            return
        assert self._closing is not None
        self._closing.set()  # ends the long polls in progress
        server.should_exit = True
        try:
            await task
        finally:
            if not task.done():
                task.cancel()
            self._task = self._server = None
        logger.info("LightningStoreServer at %s stopped", self.endpoint)

    async def __aenter__(self) -> LightningStoreServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ the application
    def _build_app(self) -> _StoreApp:
        routes = [
            Route(f"{p.API_PREFIX}/health", self._health, methods=["GET"]),
            Route(f"{p.API_PREFIX}/openapi.json", self._openapi_route, methods=["GET"]),
        ]
        handlers = self._handlers()
        endpoints = {spec.path: self._endpoint(spec, handlers[name]) for name, spec in p.ROUTES.items()}
        routes += [Route(path, endpoint, methods=["POST"]) for path, endpoint in endpoints.items()]
        app = Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_exception, Exception: self._unexpected},
        )
        return _StoreApp(app, endpoints, self._internal_error)

    async def _health(self, request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type=_JSON)

    async def _openapi_route(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._unauthorized()
        return Response(self._openapi, media_type=_JSON)

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        detail = f"{request.method} {request.url.path}: {exc.detail}"
        return _error_response(exc.status_code, kind, detail, exc.headers)

    async def _unexpected(self, request: Request, exc: Exception) -> Response:
        return self._internal_error(request.url.path, exc)

    @staticmethod
    def _internal_error(path: str, exc: Exception) -> Response:
        """A bug, not bad input (bad input is a 4xx): logged with its traceback, answered as JSON."""
        logger.error("LightningStoreServer: unexpected error in %s", path, exc_info=exc)
        return _error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")

    def _authorized(self, request: Request) -> bool:
        if self._auth_header is None:
            return True
        given = request.headers.get("authorization")
        return given is not None and hmac.compare_digest(given.encode(), self._auth_header)

    @staticmethod
    def _unauthorized() -> Response:
        return _error_response(
            401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
        )

    async def _read_body(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise _HTTPError(400, "bad_request", f"invalid Content-Length {declared!r}") from None
            if size > limit:
                raise _HTTPError(
                    413, "payload_too_large", f"request body of {size} bytes exceeds the limit of {limit}"
                )
        chunks = []
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise _HTTPError(413, "payload_too_large", f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _endpoint(self, spec: p.RouteSpec, handler: _Handler) -> _Endpoint:
        decoder = msgspec.json.Decoder(spec.body)
        cache = self._idempotency

        async def run(request: Request) -> tuple[int, bytes]:
            try:
                body = await self._read_body(request)
                try:
                    args = decoder.decode(body or b"{}")
                except msgspec.ValidationError as exc:
                    return 422, _encoder.encode(p.ErrorBody("validation_error", str(exc)))
                except msgspec.DecodeError as exc:
                    return 400, _encoder.encode(p.ErrorBody("malformed_json", f"malformed JSON: {exc}"))
                return 200, _encoder.encode(await handler(args, request))
            except _HTTPError as exc:
                return exc.status, _encoder.encode(p.ErrorBody(exc.error, exc.detail))
            except ClientDisconnect:  # gone before its body arrived: nothing was applied
                return 400, _encoder.encode(p.ErrorBody("client_disconnected", "incomplete request body"))
            except (ValueError, TypeError, OverflowError) as exc:
                return 400, _encoder.encode(p.ErrorBody(type(exc).__name__, str(exc)))

        async def endpoint(request: Request) -> Response:
            if self._auth_header is not None and not self._authorized(request):
                return self._unauthorized()
            key = request.headers.get(p.IDEMPOTENCY_HEADER) if spec.mutating else None
            if not key:
                status, content = await run(request)
                return Response(content, status, media_type=_JSON)
            if len(key) > _MAX_KEY_LENGTH:
                detail = f"{p.IDEMPOTENCY_HEADER} longer than {_MAX_KEY_LENGTH} characters"
                return _error_response(400, "bad_request", detail)
            key = f"{spec.name}:{key}"
            while (running := cache.running.get(key)) is not None:
                await running.wait()  # a retry that overtook its original: wait for its answer
            if (done := cache.done.get(key)) is not None:
                cache.done.move_to_end(key)
                return Response(done[1], done[0], media_type=_JSON, headers={"idempotent-replayed": "true"})
            cache.running[key] = event = anyio.Event()
            try:
                status, content = await run(request)
                if status != 413:
                    cache.remember(key, status, content)
            finally:
                del cache.running[key]
                event.set()
            return Response(content, status, media_type=_JSON)

        endpoint.__name__ = spec.name
        return endpoint

    async def _long_poll(
        self,
        request: Request,
        wait: Callable[[], Awaitable[Any]],
        look: Callable[[], Awaitable[Any]],
    ) -> Any:
        """Run a blocking call (``wait``), ending it early when the server stops or the client
        disconnects; then answer with ``look()`` (the same call with ``timeout=0``). The store's
        waits are side-effect free until they return, so an interrupted wait claimed nothing.
        Calls that do not wait (``timeout`` 0 / None for dequeue) skip the watcher entirely."""
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

    # ------------------------------------------------------------------ route handlers
    def _handlers(self) -> dict[str, _Handler]:
        s = self.store

        async def enqueue_rollout(a: p.EnqueueRolloutBody, request: Request) -> Any:
            return await s.enqueue_rollout(a.input, a.mode, a.resources_id, a.config, a.metadata)  # type: ignore[arg-type]

        async def enqueue_many_rollouts(a: p.EnqueueManyBody, request: Request) -> Any:
            requests = [
                EnqueueRolloutRequest(
                    input=r.input,
                    mode=r.mode,  # type: ignore[arg-type]
                    resources_id=r.resources_id,
                    config=r.config,
                    metadata=r.metadata,
                )
                for r in a.rollouts
            ]
            return await s.enqueue_many_rollouts(requests)

        async def _dequeue(request: Request, worker_id: WorkerId | None, timeout: float | None) -> Any:
            _check_timeout(timeout)
            claimed = await s.dequeue_rollout(worker_id, timeout=0 if timeout else timeout)
            if claimed is not None or not timeout:
                return claimed
            claimed = await self._long_poll(
                request,
                lambda: s.dequeue_rollout(worker_id, timeout=timeout),
                lambda: s.dequeue_rollout(worker_id),
            )
            if claimed is not None and await request.is_disconnected():
                # The claim landed as its client left: nobody would run it. Put it back at the
                # head of the queue rather than leave it "preparing" until a watchdog notices.
                if await s.unclaim_rollout(claimed.rollout_id, claimed.attempt.attempt_id):
                    logger.info("client left during a long poll; rollout %s put back", claimed.rollout_id)
                    return None
            return claimed

        async def dequeue_rollout(a: p.DequeueBody, request: Request) -> Any:
            return await _dequeue(request, a.worker_id, a.timeout)

        async def dequeue_many_rollouts(a: p.DequeueManyBody, request: Request) -> Any:
            return await s.dequeue_many_rollouts(limit=a.limit, worker_id=a.worker_id)

        async def finish_and_dequeue(a: p.FinishAndDequeueBody, request: Request) -> Any:
            # The two steps of LightningStore.finish_and_dequeue, so that only the dequeue's wait
            # is interrupted when the server stops (the update is never applied twice).
            _check_timeout(a.timeout)
            await s.update_attempt(a.rollout_id, a.attempt_id, status=a.status)  # type: ignore[arg-type]
            return await _dequeue(request, a.worker_id, a.timeout)

        async def start_rollout(a: p.StartRolloutBody, request: Request) -> Any:
            return await s.start_rollout(a.input, a.mode, a.resources_id, a.config, a.metadata, a.worker_id)  # type: ignore[arg-type]

        async def start_attempt(a: p.StartAttemptBody, request: Request) -> Any:
            return await s.start_attempt(a.rollout_id, a.worker_id)

        async def update_rollout(a: p.UpdateRolloutBody, request: Request) -> Any:
            return await s.update_rollout(
                a.rollout_id,
                input=_u(a.input),
                mode=_u(a.mode),
                resources_id=_u(a.resources_id),
                status=_u(a.status),
                config=_u(a.config),
                metadata=_u(a.metadata),
            )

        async def update_attempt(a: p.UpdateAttemptBody, request: Request) -> Any:
            return await s.update_attempt(
                a.rollout_id,
                a.attempt_id,
                status=_u(a.status),
                worker_id=_u(a.worker_id),
                last_heartbeat_time=_u(a.last_heartbeat_time),
                metadata=_u(a.metadata),
            )

        async def wait_for_rollouts(a: p.WaitForRolloutsBody, request: Request) -> Any:
            if a.timeout == 0:
                return await s.wait_for_rollouts(rollout_ids=a.rollout_ids, timeout=0)
            return await self._long_poll(
                request,
                lambda: s.wait_for_rollouts(rollout_ids=a.rollout_ids, timeout=a.timeout),
                lambda: s.wait_for_rollouts(rollout_ids=a.rollout_ids, timeout=0),
            )

        async def get_rollout_by_id(a: p.RolloutIdBody, request: Request) -> Any:
            return await s.get_rollout_by_id(a.rollout_id)

        async def query_rollouts(a: p.QueryRolloutsBody, request: Request) -> Any:
            return await s.query_rollouts(status_in=a.status_in, rollout_id_in=a.rollout_id_in)  # type: ignore[arg-type]

        async def query_attempts(a: p.RolloutIdBody, request: Request) -> Any:
            return await s.query_attempts(a.rollout_id)

        async def get_latest_attempt(a: p.RolloutIdBody, request: Request) -> Any:
            return await s.get_latest_attempt(a.rollout_id)

        async def add_span(a: Span, request: Request) -> Any:
            return await s.add_span(a)

        async def add_many_spans(a: p.AddManySpansBody, request: Request) -> Any:
            return await s.add_many_spans(a.spans)

        async def query_spans(a: p.QuerySpansBody, request: Request) -> Any:
            return await s.query_spans(a.rollout_id, a.attempt_id)

        async def get_next_span_sequence_id(a: p.SpanSequenceBody, request: Request) -> Any:
            return await s.get_next_span_sequence_id(a.rollout_id, a.attempt_id)

        async def add_resources(a: p.AddResourcesBody, request: Request) -> Any:
            return await s.add_resources(a.resources)

        async def update_resources(a: p.UpdateResourcesBody, request: Request) -> Any:
            return await s.update_resources(a.resources_id, a.resources)

        async def get_latest_resources(a: p.NoArgs, request: Request) -> Any:
            return await s.get_latest_resources()

        async def get_resources_by_id(a: p.ResourcesIdBody, request: Request) -> Any:
            return await s.get_resources_by_id(a.resources_id)

        async def query_resources(a: p.NoArgs, request: Request) -> Any:
            return await s.query_resources()

        async def query_workers(a: p.QueryWorkersBody, request: Request) -> Any:
            return await s.query_workers(status_in=a.status_in)  # type: ignore[arg-type]

        async def get_worker_by_id(a: p.WorkerIdBody, request: Request) -> Any:
            return await s.get_worker_by_id(a.worker_id)

        async def update_worker(a: p.UpdateWorkerBody, request: Request) -> Any:
            return await s.update_worker(a.worker_id, _u(a.heartbeat_stats))

        async def statistics(a: p.NoArgs, request: Request) -> Any:
            return await s.statistics()

        handlers: dict[str, _Handler] = {name: fn for name, fn in locals().items() if name in p.ROUTES}
        missing = set(p.ROUTES) - set(handlers)
        assert not missing, f"routes without a handler: {sorted(missing)}"
        return handlers

    # ------------------------------------------------------------------ in-process: the wrapped store
    # Calls made on the server object in its own process go straight to the wrapped store.
    enqueue_rollout = delegate(LightningStore.enqueue_rollout)
    enqueue_many_rollouts = delegate(LightningStore.enqueue_many_rollouts)
    dequeue_rollout = delegate(LightningStore.dequeue_rollout)
    dequeue_many_rollouts = delegate(LightningStore.dequeue_many_rollouts)
    unclaim_rollout = delegate(LightningStore.unclaim_rollout)
    finish_and_dequeue = delegate(LightningStore.finish_and_dequeue)
    start_rollout = delegate(LightningStore.start_rollout)
    start_attempt = delegate(LightningStore.start_attempt)
    update_rollout = delegate(LightningStore.update_rollout)
    update_attempt = delegate(LightningStore.update_attempt)
    wait_for_rollouts = delegate(LightningStore.wait_for_rollouts)
    get_rollout_by_id = delegate(LightningStore.get_rollout_by_id)
    query_rollouts = delegate(LightningStore.query_rollouts)
    query_attempts = delegate(LightningStore.query_attempts)
    get_latest_attempt = delegate(LightningStore.get_latest_attempt)
    add_span = delegate(LightningStore.add_span)
    add_many_spans = delegate(LightningStore.add_many_spans)
    query_spans = delegate(LightningStore.query_spans)
    get_next_span_sequence_id = delegate(LightningStore.get_next_span_sequence_id)
    add_resources = delegate(LightningStore.add_resources)
    update_resources = delegate(LightningStore.update_resources)
    get_latest_resources = delegate(LightningStore.get_latest_resources)
    get_resources_by_id = delegate(LightningStore.get_resources_by_id)
    query_resources = delegate(LightningStore.query_resources)
    query_workers = delegate(LightningStore.query_workers)
    get_worker_by_id = delegate(LightningStore.get_worker_by_id)
    update_worker = delegate(LightningStore.update_worker)
    statistics = delegate(LightningStore.statistics)


@functools.cache
def _openapi_bytes() -> bytes:
    return _encoder.encode(p.openapi_document())


def _http_protocol() -> type[Any]:
    """uvicorn's HTTP protocol class (httptools' C parser when installed), writes corked."""
    from ._corked import corked

    if _has_httptools():
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return corked(HttpToolsProtocol)
    from uvicorn.protocols.http.h11_impl import H11Protocol  # pragma: no cover - non-CPython

    return corked(H11Protocol)  # pragma: no cover


def _has_httptools() -> bool:
    try:
        import httptools  # noqa: F401
    except ImportError:  # pragma: no cover - non-CPython
        return False
    return True


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and not timeout >= 0:  # also rejects NaN
        raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")

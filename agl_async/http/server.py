"""``LightningStoreServer``: serve a store over HTTP from inside the caller's event loop.

The parts: the ASGI application with its routes and errors (:mod:`agl_async.http.app`), the
embedded uvicorn (``_serving``: binding, start, stop) and the idempotency cache
(``_idempotency``). The server is also a ``LightningStore`` itself: calls made on it in its own
process go straight to the wrapped store.

Lifecycle
    ``await serve(task_status=...)`` is the server as one structured task: it binds the socket
    itself (so "address in use" is an immediate ``OSError`` naming host:port, raised before
    anything else starts), reports started once the socket accepts connections, and returns after
    :meth:`~LightningStoreServer.stop`; ``async with server:`` runs it in a task group of its own
    (``tg.start``) and stops it gracefully on the way out, however the block ends (a cancelled
    block included: the server keeps serving until then, so a shutdown inside the block can
    still use it; the stop is bounded by ``graceful_timeout``). ``await start()`` / ``await
    stop()`` are the same for code without a task group of its own: ``start()`` runs ``serve`` in
    a background task of the running (asyncio) loop and ``stop()`` ends and awaits it.

    Stopping: stop accepting, end the long polls in progress (a waiting ``dequeue_rollout`` answers
    ``None``, a waiting ``wait_for_rollouts`` what has finished so far), let requests in flight
    finish for up to ``graceful_timeout`` seconds, then cancel the rest; when ``stop()`` returns
    no task of the server is left. Cancelling ``serve`` (or ``stop()``, or ``start()``) is a hard
    stop: listeners and connections closed, requests in flight cancelled, socket released.
    (``async with`` is never stopped hard: see above.)

Signals
    uvicorn normally installs SIGINT/SIGTERM handlers while it serves. The embedded server does
    not: a Ctrl-C reaches the host application exactly as if no server were running.

Wire protocol and errors
    One ``POST /v1/<method>`` per store method (see :mod:`agl_async.http.protocol`), plus
    ``GET /v1/health`` (never authenticated), ``GET /v1/openapi.json`` and OTLP/HTTP trace export
    at ``POST /v1/traces`` (:mod:`agl_async.http.otlp`, whose errors are OTLP's). Every error is a JSON body
    ``{"error": kind, "detail": message}``: 400 for malformed JSON and for the store's
    ``ValueError`` (the client re-raises it as ``ValueError`` with the same message), 401 for a
    missing/wrong bearer token, 404 unknown route, 405 wrong method, 413 body over
    ``max_body_bytes``, 422 a body that does not match the route's schema. A failing request never
    stops the server.

Idempotency
    A mutating request may carry an ``Idempotency-Key`` header. The server remembers the answers
    to the last ``idempotency_cache_size`` keys (within ``idempotency_cache_bytes``); a retry with
    a known key gets the remembered answer (and a retry arriving while the first is still running
    waits for it) instead of the change being applied twice. A key is bound to its request
    (method, path, body): reused for a different one it gets a 422 and changes nothing; auth (401)
    and the body limit (413) are checked before anything is replayed.

Across hosts (see docs/serving.md)
    ``ssl_certfile`` / ``ssl_keyfile`` serve HTTPS (loaded when the server is made: a bad file is
    a ``ValueError`` naming it). Binding an address that is not loopback without a token raises
    ``ValueError`` unless ``allow_unauthenticated=True``. The token is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import os
import socket
from types import TracebackType
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus

from .._net import bind_socket, http_url
from ..store.base import LightningStore
from ..store.delegation import DelegatingStore
from . import otlp
from . import protocol as p
from ._idempotency import IdempotencyCache
from ._security import check_bind, check_certificate
from ._serving import EmbeddedUvicorn, serve_on
from .app import StoreApp

__all__ = ["APP_EXTENSIONS", "DEFAULT_MAX_BODY_BYTES", "LightningStoreServer"]

logger = logging.getLogger("agl_async")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024

#: Features installed on every server's application, one ``"module:function"`` row each: the
#: function is called with the :class:`~agl_async.http.app.StoreApp` when the server is made
#: (it adds routes and middleware; see :mod:`agl_async.http.app`). Imported only then.
APP_EXTENSIONS: list[str] = [
    "agl_async.http.metrics:install",  # GET /metrics and the request-metrics middleware (issue 14)
    "agl_async.http.dashboard:install",  # GET / and /v1/dashboard/... (issue 14)
    "agl_async.http.otlp:install",  # POST /v1/traces (issue 11)
]


class LightningStoreServer(DelegatingStore):
    """Serve ``store`` over HTTP on ``host:port`` (``port=0``: a free port, see :attr:`port`).

    ``auth_token`` (default: env ``AGL_SERVER_TOKEN``; ``""`` disables) makes every route but
    health require ``Authorization: Bearer <token>``. Binding a non-loopback address without a
    token raises ``ValueError`` (naming the host, ``auth_token`` / ``AGL_SERVER_TOKEN`` and
    ``allow_unauthenticated``) unless ``allow_unauthenticated=True``. ``ssl_certfile`` /
    ``ssl_keyfile`` (PEM; the key may sit in the certificate file) serve HTTPS. Bodies over
    ``max_body_bytes`` get a 413.

    ``dashboard`` serves the live dashboard at ``GET /`` (:mod:`agl_async.http.dashboard`; its
    data routes take the bearer token or the dashboard's session cookie) and ``metrics`` the
    Prometheus exposition at ``GET /metrics`` (:mod:`agl_async.http.metrics`, needs the
    ``metrics`` extra); both on by default, off: 404. They are settings of the extensions in
    :data:`APP_EXTENSIONS` (``app.options``).
    ``reuse_port``: bind with ``SO_REUSEPORT``, so that several processes serving one shared store
    (``agl-async serve --workers N``) listen on one address and the kernel spreads connections.
    """

    def __init__(
        self,
        store: LightningStore,
        host: str = "localhost",
        port: int = 4747,
        *,
        auth_token: str | None = None,
        ssl_certfile: str | os.PathLike[str] | None = None,
        ssl_keyfile: str | os.PathLike[str] | None = None,
        allow_unauthenticated: bool = False,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        graceful_timeout: float = 5.0,
        idempotency_cache_size: int = 8192,
        idempotency_cache_bytes: int = 64 * 1024 * 1024,
        log_level: str = "warning",
        metrics: bool = True,
        dashboard: bool = True,
        reuse_port: bool = False,  # [issue 12: agl-async serve --workers] several processes, one port
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
        self.max_body_bytes = max_body_bytes
        self.graceful_timeout = graceful_timeout
        self.log_level = log_level
        self.reuse_port = reuse_port  # [issue 12]
        self._server: EmbeddedUvicorn | None = None
        self._serving = False
        self._task: asyncio.Task[None] | None = None
        self._exit_stack: contextlib.AsyncExitStack | None = None
        self._done: anyio.Event | None = None
        # secure defaults and HTTPS (http/_security.py)
        check_bind(host, self.auth_token, allow_unauthenticated)
        self.allow_unauthenticated = allow_unauthenticated
        self.ssl_certfile, self.ssl_keyfile = check_certificate(ssl_certfile, ssl_keyfile)
        self.app = StoreApp(
            store,
            auth_token=self.auth_token,
            max_body_bytes=max_body_bytes,
            idempotency=IdempotencyCache(idempotency_cache_size, idempotency_cache_bytes),
            openapi=_openapi_bytes(),
            options={"metrics": metrics, "dashboard": dashboard},
        )
        for extension in APP_EXTENSIONS:
            module, _, function = extension.partition(":")
            getattr(importlib.import_module(module), function)(self.app)

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
        return http_url(self.host, self.port, bound=True, scheme="https" if self.ssl_certfile else "http")

    @property
    def started(self) -> bool:
        return self._serving

    # ------------------------------------------------------------------ the structured form
    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`stop` (see the module docstring); for ``await tg.start(server.serve)``.

        Raises ``OSError`` naming host:port when the address cannot be bound, and
        ``RuntimeError`` when already serving or not on asyncio (uvicorn).
        """
        if self._serving:
            raise RuntimeError(f"{self!r} is already started")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "LightningStoreServer runs on asyncio (uvicorn): start it on an asyncio loop"
            ) from None
        sock = self._bind()
        self._serving = True
        self._done = done = anyio.Event()
        self.app.open()

        def started() -> None:
            logger.info("LightningStoreServer serving %s at %s", type(self.store).__name__, self.endpoint)
            task_status.started()

        try:
            await serve_on(
                self.app,
                sock,
                graceful_timeout=self.graceful_timeout,
                log_level=self.log_level,
                on_server=self._set_server,
                ssl_certfile=self.ssl_certfile,
                ssl_keyfile=self.ssl_keyfile,
                task_status=_Started(started),
            )
        finally:
            sock.close()
            self._server = None
            self._serving = False
            done.set()
        logger.info("LightningStoreServer at %s stopped", self.endpoint)

    def _set_server(self, server: EmbeddedUvicorn) -> None:
        self._server = server

    def _bind(self) -> socket.socket:
        sock = bind_socket(
            self.host, self._requested_port, what="LightningStoreServer", reuse_port=self.reuse_port
        )
        self._bound_port = sock.getsockname()[1]
        return sock

    def end_long_polls(self) -> None:
        """Answer long polls at once from now on, while still serving: the ones waiting end with a
        last non-blocking look, later ones do not wait. For the end of a run (the client-server
        strategy calls it when the algorithm returns), so that idle runners see the stop event
        without waiting out their poll; ``stop()`` does it first too. A no-op when not started."""
        self.app.end_long_polls()

    def _request_stop(self) -> None:
        self.app.end_long_polls()  # ends the long polls in progress
        if self._server is not None:
            self._server.request_stop()

    async def _serve_until_stopped(self, *, task_status: TaskStatus[None]) -> None:
        # Shielded: the block of `async with` may still use the server while it is being
        # cancelled (a shutdown that talks to runners); __aexit__ always stops it, gracefully.
        with anyio.CancelScope(shield=True):
            await self.serve(task_status=task_status)

    async def __aenter__(self) -> LightningStoreServer:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            await tg.start(self._serve_until_stopped)
        except BaseException:
            await tg.__aexit__(None, None, None)  # serve never started: the error is start()'s own
            raise
        stack = contextlib.AsyncExitStack()
        stack.push_async_exit(tg.__aexit__)
        stack.callback(self._request_stop)  # runs before the task group waits for serve
        self._exit_stack = stack
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack, self._exit_stack = self._exit_stack, None
        if stack is None:  # not entered with `async with` (started with start()): stop that
            await self.stop()
            return
        # A graceful stop whatever ends the block (as stop() would); the block's exception, if
        # any, propagates as itself afterwards.
        await stack.__aexit__(None, None, None)

    # ------------------------------------------------------------------ the background form
    async def start(self) -> None:
        """Start :meth:`serve` as a background task of the running loop; return once connections
        are accepted. Raises what ``serve`` raises (``OSError`` naming host:port, ``RuntimeError``
        when already started). Cancelling ``start()`` leaves nothing running."""
        if self._serving or self._task is not None:
            raise RuntimeError(f"{self!r} is already started")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "LightningStoreServer runs on asyncio (uvicorn): start it on an asyncio loop"
            ) from None
        ready: asyncio.Future[None] = loop.create_future()

        def started() -> None:
            ready.set_result(None)

        task = loop.create_task(self.serve(task_status=_Started(started)))
        task.set_name(f"LightningStoreServer {self.endpoint}")
        self._task = task
        try:
            await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                self._task = None
                await task  # re-raises the startup error
                raise RuntimeError(f"LightningStoreServer at {self.endpoint} did not start")
        except BaseException:
            if self._task is not None:
                self._task = None
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            raise

    async def stop(self) -> None:
        """Stop gracefully (see the module docstring); a no-op when not started."""
        task = self._task
        if task is None:
            if self._serving and self._done is not None:  # `async with` or a task group of the caller's
                self._request_stop()
                await self._done.wait()
            return
        self._request_stop()
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():  # stop() itself was cancelled: stop hard
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            raise
        finally:
            self._task = None


class _Started:
    """A ``TaskStatus`` that calls ``on_started`` (the server's startup report)."""

    def __init__(self, on_started: Any) -> None:
        self._on_started = on_started

    def started(self, value: None = None) -> None:
        self._on_started()


@functools.cache
def _openapi_bytes() -> bytes:
    document = p.openapi_document()
    document["paths"].update(otlp.openapi_paths())  # POST /v1/traces (agl_async.http.otlp)
    return msgspec.json.encode(document)

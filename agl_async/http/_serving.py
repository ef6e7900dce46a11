"""The embedded uvicorn server: an ASGI app served on a pre-bound socket inside the caller's loop.

:func:`serve_on` runs uvicorn as a plain coroutine of the calling task — no thread, no detached
task — and reports through ``task_status`` once the socket accepts connections, so it fits
``await tg.start(serve_on, ...)``. It returns after a graceful stop (``request_stop``: stop
accepting, let requests in flight finish for up to ``graceful_timeout`` seconds, then cancel them).
Cancelling it is a hard stop: the listeners are closed, connections are told to close and requests
still in flight are cancelled, before the cancellation propagates.

Signals: uvicorn normally installs SIGINT/SIGTERM handlers while it serves. The embedded server
does not: a Ctrl-C reaches the host application exactly as if no server were running.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Generator
from typing import Any

import anyio
import uvicorn
from anyio.abc import TaskStatus

__all__ = ["EmbeddedUvicorn", "serve_on"]


class EmbeddedUvicorn(uvicorn.Server):
    """uvicorn's Server minus signal capture, with a callback once startup has finished, and
    ``should_exit`` backed by an event: uvicorn's own main loop looks at the flag every 0.1 s, this
    one wakes as soon as it is set, so that stopping a server costs no polling delay."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        self._exit = asyncio.Event()  # before super().__init__, which assigns should_exit
        super().__init__(config)
        self._on_started = on_started

    @property
    def should_exit(self) -> bool:
        return self._exit.is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value:
            self._exit.set()
        else:
            self._exit.clear()

    def request_stop(self) -> None:
        """Begin the graceful stop (see the module docstring)."""
        self.should_exit = True

    async def main_loop(self) -> None:
        await self.on_tick(0)  # sets the default headers, as uvicorn's loop does first
        await self._exit.wait()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Leave SIGINT/SIGTERM to the host application.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_started()

    def close_now(self) -> None:
        """The hard stop: close the listeners and connections, cancel the requests in flight."""
        self.force_exit = True
        for server in getattr(self, "servers", ()):
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        for task in list(self.server_state.tasks):
            task.cancel()


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


async def serve_on(
    app: Any,
    sock: socket.socket,
    *,
    graceful_timeout: float,
    log_level: str,
    on_server: Callable[[EmbeddedUvicorn], None],
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on the bound, listening ``sock`` until the server's ``request_stop()``; asyncio
    only. ``on_server`` receives the server before it starts (to stop it later). With
    ``ssl_certfile`` (and ``ssl_keyfile``, unless the key is in the certificate file) it serves
    HTTPS: uvicorn's TLS, Python's ``ssl`` defaults (TLS 1.2+)."""
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_level=log_level,
        log_config=None,  # an embedded server leaves the host's logging configuration alone
        access_log=False,
        http=_http_protocol(),  # [corked writes hook] agl_async/http/_corked.py
        proxy_headers=False,  # a store server reads no X-Forwarded-* headers: skip the middleware
        timeout_keep_alive=60,  # longer than httpx's 5 s idle expiry: the client closes first
        timeout_graceful_shutdown=graceful_timeout,  # type: ignore[arg-type]  # a float works
        server_header=False,
        date_header=False,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
    )
    server = EmbeddedUvicorn(config, on_started=task_status.started)
    on_server(server)
    try:
        await server.serve(sockets=[sock])
    except BaseException:
        server.close_now()
        raise
    if not server.started:
        raise RuntimeError("the embedded uvicorn server did not start")

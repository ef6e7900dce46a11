"""The transport under ``LightningStoreClient``'s ``httpx.AsyncClient``: httpx's own, or aiohttp.

``LightningStoreClient`` speaks httpx's API (requests, responses, exceptions, timeouts); what moves
the bytes is an ``httpx.AsyncBaseTransport`` chosen here:

``"httpx"``
    httpx's default transport (httpcore's connection pool). Works on asyncio and trio.
``"aiohttp"``
    :class:`AiohttpTransport`, aiohttp's connection pool and C HTTP parser (asyncio only). It
    costs the client process about half the CPU per request of httpcore at one request at a time,
    and stays flat as concurrency grows, where httpcore's pool grows quadratically with queued
    requests (encode/httpcore#1035): measured by ``benchmarks/http_client.py``.
``"auto"`` (the default)
    ``"aiohttp"`` on asyncio for ``http://`` endpoints, ``"httpx"`` otherwise (trio, TLS). The
    environment variable ``AGL_HTTP_TRANSPORT=httpx`` makes ``"auto"`` mean ``"httpx"`` everywhere
    (a switch for deployments, e.g. to rule the transport out when chasing a network problem).

:class:`AiohttpTransport` maps aiohttp's failures onto httpx's exceptions so the client's retry
logic sees the same thing from both: a refused or failed connect is ``httpx.ConnectError``, a
connection that closed before the answer ``httpx.RemoteProtocolError``, a reset while reading
``httpx.ReadError``, timeouts ``httpx.ConnectTimeout`` / ``httpx.ReadTimeout`` /
``httpx.PoolTimeout``. Cancelling a request closes its connection (aiohttp does not return a
half-read connection to the pool). The transport creates its ``aiohttp.ClientSession`` lazily on
first use, in the event loop that uses it, and ``aclose()`` closes it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from typing import Any, Literal

import httpx

__all__ = [
    "TRANSPORTS",
    "TRANSPORT_ENV",
    "AiohttpTransport",
    "TransportName",
    "make_transport",
    "resolve_transport",
]

TransportName = Literal["auto", "httpx", "aiohttp"]
TRANSPORTS: tuple[str, ...] = ("auto", "httpx", "aiohttp")
#: ``httpx``: ``"auto"`` means httpx's transport everywhere.
TRANSPORT_ENV = "AGL_HTTP_TRANSPORT"

#: Idle connections are closed after this many seconds (the store server keeps them 60 s, so the
#: client always closes first and never sends on a connection the server is closing).
KEEPALIVE_EXPIRY = 5.0


def _running_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def resolve_transport(name: str, endpoint: str) -> Literal["httpx", "aiohttp"]:
    """The transport ``name`` means for ``endpoint`` in the running event loop.

    ``ValueError`` for an unknown name, or for ``"aiohttp"`` outside asyncio or without aiohttp.
    """
    if name not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}; got {name!r}")
    if name == "auto":
        forced = os.environ.get(TRANSPORT_ENV, "auto").strip().lower() or "auto"
        if forced not in ("auto", "httpx"):
            raise ValueError(f"{TRANSPORT_ENV} must be 'httpx' or 'auto', got {forced!r}")
        name = forced
    if name == "httpx":
        return "httpx"
    usable = _running_asyncio() and importlib.util.find_spec("aiohttp") is not None
    if name == "aiohttp":
        if not usable:
            raise ValueError("the aiohttp transport needs aiohttp installed and an asyncio event loop")
        return "aiohttp"
    return "aiohttp" if usable and endpoint.lower().startswith("http://") else "httpx"


def make_transport(
    name: str, *, max_connections: int | None = 100, verify: bool = True
) -> httpx.AsyncBaseTransport:
    """A new transport: ``"httpx"`` or ``"aiohttp"`` (already resolved), pooling at most
    ``max_connections`` connections (``None``: no limit). ``verify``: check TLS certificates
    (``"httpx"`` only; the aiohttp transport is for plain HTTP)."""
    if name == "aiohttp":
        return AiohttpTransport(max_connections=max_connections)
    if name == "httpx":
        limits = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=KEEPALIVE_EXPIRY,
        )
        return httpx.AsyncHTTPTransport(limits=limits, verify=verify, trust_env=False)
    raise ValueError(f"unknown transport {name!r}")


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An ``httpx`` transport on an ``aiohttp.ClientSession`` (plain HTTP/1.1; no proxies).

    The whole response body is read before the response is returned (store answers are small
    JSON documents), so the ``httpx.Response`` it returns is already complete.
    """

    def __init__(self, *, max_connections: int | None = 100) -> None:
        self.max_connections = max_connections
        self._session: Any = None
        self._timeouts: dict[tuple[float | None, float | None, float | None], Any] = {}

    def _open(self) -> Any:
        import aiohttp

        connector = aiohttp.TCPConnector(
            limit=self.max_connections or 0,
            limit_per_host=0,
            keepalive_timeout=KEEPALIVE_EXPIRY,
            ttl_dns_cache=None,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            trust_env=False,
        )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        status, raw_headers, content = await self._request(
            request.method,
            str(request.url),
            request.content or None,
            headers,
            request.extensions.get("timeout", {}),
            request,
        )
        return httpx.Response(status, headers=raw_headers, content=content, request=request)

    async def post(
        self, url: str, content: bytes, headers: dict[str, str], timeout: dict[str, float | None]
    ) -> tuple[int, bytes]:
        """One POST without httpx's request and response objects (``LightningStoreClient``'s hot
        path): ``(status, body)``; failures raise the same httpx exceptions as
        :meth:`handle_async_request`."""
        status, _, content = await self._request("POST", url, content, headers, timeout, None)
        return status, content

    async def _request(
        self,
        method: str,
        url: str,
        content: bytes | None,
        headers: Any,
        timeouts: dict[str, float | None],
        request: httpx.Request | None,
    ) -> tuple[int, Any, bytes]:
        import aiohttp

        session = self._session if self._session is not None else self._open()
        key = (timeouts.get("pool"), timeouts.get("connect"), timeouts.get("read"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            timeout = self._timeouts[key] = aiohttp.ClientTimeout(
                total=None,
                connect=key[0],  # waiting for a pooled connection plus connecting
                sock_connect=key[1],
                sock_read=key[2],
            )
        try:
            async with session.request(
                method,
                url,
                data=content,
                headers=headers,
                allow_redirects=False,
                compress=None,
                timeout=timeout,
            ) as response:
                body = await response.read()
                return response.status, response.raw_headers, body
        except aiohttp.ClientError as exc:
            raise _as_httpx_error(exc, request) from exc
        except asyncio.TimeoutError as exc:  # a bare timeout (no aiohttp subclass): reading
            raise httpx.ReadTimeout(str(exc) or "timed out", request=request) from exc

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _as_httpx_error(exc: Exception, request: httpx.Request | None) -> httpx.TransportError:
    import aiohttp

    message = str(exc) or type(exc).__name__
    kind: type[httpx.TransportError]
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        kind = httpx.ConnectTimeout
    elif isinstance(exc, aiohttp.ServerTimeoutError):
        kind = httpx.ReadTimeout
    elif isinstance(exc, aiohttp.ClientConnectorError):
        kind = httpx.ConnectError
    elif isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientResponseError):
        kind = httpx.RemoteProtocolError
    elif isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientOSError):
        kind = httpx.ReadError
    elif isinstance(exc, aiohttp.InvalidURL):
        kind = httpx.UnsupportedProtocol
    else:
        kind = httpx.RemoteProtocolError
    return kind(message, request=request)

"""``LightningStoreClient``: the whole ``LightningStore`` API over HTTP (httpx).

Connections
    One ``httpx.AsyncClient`` (one keep-alive connection pool) per client, created lazily by the
    first call in the process and event loop that use it. Pickling keeps only the configuration,
    so a client handed to a spawned/forked process reconnects there on first use; a client used
    from a second event loop (or after a fork) starts a fresh pool and drops the old one
    unclosed (it belongs to the other loop). Works on asyncio and trio.

Failures
    Connection failures (refused, reset, closed before the answer) are retried after each delay
    of ``retry_delays`` (bounded backoff, default ~8 s in all); after the last one the call raises
    :class:`StoreConnectionError` (a ``ConnectionError``) naming the endpoint. A request that gets
    no answer within its HTTP timeout raises it too. Nothing waits unbounded except the calls the
    caller asked to wait unbounded (``wait_for_rollouts(timeout=None)``,
    ``dequeue_rollout(timeout=inf)``): for those the HTTP read timeout is the wait plus
    ``request_timeout`` (or none), so the server's answer always arrives first.

TLS
    ``https://`` endpoints are verified per ``verify`` (httpx's convention: ``True``, ``False``, a
    CA bundle path or an ``ssl.SSLContext``; see :mod:`agl_async.http._tls`). A certificate that
    does not verify, a server that does not speak TLS, or an ``http://`` endpoint whose port speaks
    TLS raises :class:`StoreTLSError` (a ``StoreConnectionError``) at the first attempt, naming the
    endpoint: such a misconfiguration is never retried.

    The server's 400/404/413/422 answers are raised as ``ValueError`` with the server's message
    (exactly what the in-process store raises); 401/403 as :class:`StoreAuthError`
    (a ``PermissionError``); other answers as ``RuntimeError`` naming the endpoint.

Idempotency
    Every mutating call sends an ``Idempotency-Key`` header, the same on each of its retries; the
    server replays its first answer to a repeated key, so a retry after a lost response never
    enqueues, claims or stores anything twice.

The end of a run
    Once its server says the run is over (``LightningStoreServer.end_run``: a dequeue is answered
    ``204 No Content``, nothing claimed), :attr:`~agl_async.LightningStore.run_over` is true: the
    runner loop stops on it, so runners attached to a server whose algorithm has finished exit 0
    at once instead of retrying a server that has gone away.

Cancellation
    Cancelling a call abandons its request (the connection is closed). The server notices the
    disconnect during long polls and claims nothing for it; a short mutating request already
    received by the server may still be applied.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from http import HTTPStatus
from types import TracebackType
from typing import Any, TypeVar, cast

import anyio
import httpx
import msgspec

from .._backend import loop_identity
from .._validate import as_config, as_enqueue_requests, as_resources, check_json_value
from ..store.base import LightningStore
from ..types import AttemptedRollout, AttemptStatus, Rollout, Span, Unset, WorkerId
from . import _tls
from . import protocol as p
from .transport import TRANSPORTS, AiohttpTransport, TransportName, resolve_transport  # [transport seam]

__all__ = [
    "DEFAULT_RETRY_DELAYS",
    "LightningStoreClient",
    "StoreAuthError",
    "StoreConnectionError",
    "StoreTLSError",
]

logger = logging.getLogger("agl_async.http.client")

#: Seconds to wait before each retry of a request that could not reach the server (7.85 s in all).
DEFAULT_RETRY_DELAYS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0)

_RETRYABLE = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
    httpx.PoolTimeout,
)

R = TypeVar("R")
_encoder = msgspec.json.Encoder()
_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    name: msgspec.json.Decoder(spec.result) for name, spec in p.ROUTES.items()
}
_error_decoder = msgspec.json.Decoder(p.ErrorBody)


class StoreConnectionError(ConnectionError):
    """The store server could not be reached (after the retries) or did not answer in time."""


class StoreTLSError(StoreConnectionError):
    """TLS with the store server cannot work as configured (certificate not trusted, a peer that
    does not speak TLS, plain HTTP to a TLS port). Raised at once: retrying cannot help."""


class StoreAuthError(PermissionError):
    """The store server refused the request's credentials (401/403)."""


def _as_span(span: Any) -> Span:
    if not isinstance(span, Span):
        raise ValueError(f"expected a Span, got {type(span).__name__}")
    return span


def _as_spans(spans: Any) -> list[Span]:
    return [_as_span(span) for span in spans]


def _as_config_or_unset(config: Any) -> Any:
    return config if isinstance(config, Unset) else as_config(config)


def _json_rule(name: str) -> Callable[[Any], Any]:
    """The JSON rule of the stores, checked here: the wire would silently change what it breaks
    (NaN to null, a tuple to a list), so the server could not tell."""

    def check(value: Any) -> Any:
        return value if isinstance(value, Unset) else check_json_value(value, name)

    return check


def _as_checked_requests(rollouts: Any) -> Any:
    requests = as_enqueue_requests(rollouts)
    for request in requests:
        check_json_value(request.input, "input")
        check_json_value(request.metadata, "metadata")
    return requests


#: Arguments checked and converted on this side, by parameter name, whatever the method: what the
#: in-process store accepts (mappings for structs, any sequence) becomes what the wire carries.
_PREPARE: dict[str, Callable[[Any], Any]] = {
    "config": _as_config_or_unset,
    "resources": as_resources,
    "rollouts": _as_checked_requests,
    "spans": _as_spans,
    "input": _json_rule("input"),
    "metadata": _json_rule("metadata"),
    "heartbeat_stats": _json_rule("heartbeat_stats"),
}

M = TypeVar("M", bound=Callable[..., Coroutine[Any, Any, Any]])


def _remote(method: M) -> M:
    """The client form of a plain ``LightningStore`` method: its arguments, bound by name, become
    the route's body; the route's result is returned. Keeps the method's type, name, docstring
    and (through ``__wrapped__``) signature."""
    spec = p.ROUTES[method.__name__]
    params = list(inspect.signature(method).parameters.values())[1:]
    positional = [q.name for q in params if q.kind is q.POSITIONAL_OR_KEYWORD]
    prepare = [(q.name, _PREPARE[q.name]) for q in params if q.name in _PREPARE]
    body_type = spec.body

    async def call(self: LightningStoreClient, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(positional):
            raise TypeError(f"{spec.name}() takes {len(positional)} positional arguments, got {len(args)}")
        if args:
            for name, value in zip(positional, args, strict=False):
                if name in kwargs:
                    raise TypeError(f"{spec.name}() got multiple values for argument {name!r}")
                kwargs[name] = value
        for name, convert in prepare:
            if name in kwargs:
                kwargs[name] = convert(kwargs[name])
        return await self._call(spec, body_type(**kwargs))

    functools.update_wrapper(call, method, updated=())
    call.__qualname__ = f"LightningStoreClient.{spec.name}"
    return cast(M, call)


class LightningStoreClient(LightningStore):
    """Talk to a ``LightningStoreServer`` at ``endpoint`` (e.g. ``"http://127.0.0.1:4747"``).

    ``auth_token`` (default: env ``AGL_SERVER_TOKEN``; ``""`` sends none) is sent as a bearer
    token. ``verify`` (``https://`` only) follows httpx: ``True``, ``False``, a CA bundle path, or an
    ``ssl.SSLContext`` (which makes the client unpicklable: hand runner processes a path).
    ``request_timeout`` bounds each request that does not wait by design;
    ``connect_timeout`` each connection attempt; ``retry_delays`` the retries (see the module
    docstring). ``max_connections`` caps the pool (concurrent requests of this client).
    ``transport``: what carries the requests under httpx's API — ``"auto"`` (aiohttp's pool on
    asyncio for ``http://``, else httpx's), ``"httpx"`` or ``"aiohttp"``
    (:mod:`agl_async.http.transport`).
    """

    #: A long poll abandoned mid-request may have been answered with a claim already.
    long_poll_is_cancel_safe = False

    def __init__(
        self,
        endpoint: str,
        auth_token: str | None = None,
        verify: _tls.Verify = True,
        *,
        request_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
        max_connections: int = 100,
        transport: TransportName = "auto",
    ) -> None:
        if transport not in TRANSPORTS:  # [transport seam]
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}; got {transport!r}")
        self.transport: TransportName = transport
        if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
            raise ValueError(
                f"endpoint must be an http(s) URL such as 'http://127.0.0.1:4747', got {endpoint!r}"
            )
        self.endpoint = endpoint.rstrip("/")
        if auth_token is None:
            auth_token = os.environ.get("AGL_SERVER_TOKEN") or None
        self.auth_token = auth_token or None
        self.verify = _tls.check_verify(verify)
        self._ssl: bool | ssl.SSLContext | None = None  # made from verify on first https use
        if isinstance(self.verify, str) and self._https:
            self._ssl = _tls.ssl_context_of(self.verify)  # a bad CA bundle is a ValueError now
        self.request_timeout = float(request_timeout)
        self.connect_timeout = float(connect_timeout)
        self.retry_delays = tuple(float(d) for d in retry_delays)
        self.max_connections = int(max_connections)
        self._http: httpx.AsyncClient | None = None
        self._send: _Send = _not_connected
        self._http_owner: tuple[int, object] | None = None
        self.run_over = False  # learnt from the server's answers (LightningStore.run_over)
        self._headers = {"content-type": "application/json"}
        if self.auth_token:
            self._headers["authorization"] = f"Bearer {self.auth_token}"
        self._timeout = httpx.Timeout(self.request_timeout, connect=self.connect_timeout).as_dict()
        self._url_text = {name: self.endpoint + spec.path for name, spec in p.ROUTES.items()}

    def __repr__(self) -> str:
        return f"LightningStoreClient({self.endpoint!r})"

    # ------------------------------------------------------------------ pickling: config only
    def __getstate__(self) -> dict[str, Any]:
        if isinstance(self.verify, ssl.SSLContext):
            raise TypeError(
                f"LightningStoreClient({self.endpoint!r}, verify=<ssl.SSLContext>) does not pickle (an "
                "SSLContext cannot cross into another process); pass verify='<CA bundle path>' to hand "
                "this client to runner processes"
            )
        return {
            "endpoint": self.endpoint,
            "auth_token": self.auth_token,
            "verify": self.verify,
            "request_timeout": self.request_timeout,
            "connect_timeout": self.connect_timeout,
            "retry_delays": self.retry_delays,
            "max_connections": self.max_connections,
            "transport": self.transport,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["endpoint"],
            state["auth_token"] or "",
            state.get("verify", True),
            request_timeout=state["request_timeout"],
            connect_timeout=state["connect_timeout"],
            retry_delays=state["retry_delays"],
            max_connections=state["max_connections"],
            transport=state.get("transport", "auto"),
        )

    # ------------------------------------------------------------------ connection pool
    def _client(self) -> httpx.AsyncClient:
        owner = (os.getpid(), loop_identity())
        if (
            self._http is None
            or self._http_owner is None
            or self._http_owner[0] != owner[0]
            or (self._http_owner[1] is not owner[1])
        ):
            # [transport seam] aiohttp's pool on asyncio for http:// (agl_async.http.transport)
            transport = None
            if resolve_transport(self.transport, self.endpoint) == "aiohttp":
                transport = AiohttpTransport(max_connections=self.max_connections)
            self._http = httpx.AsyncClient(
                base_url=self.endpoint,
                headers=self._headers,
                timeout=httpx.Timeout(self.request_timeout, connect=self.connect_timeout),
                limits=httpx.Limits(
                    max_connections=self.max_connections, max_keepalive_connections=self.max_connections
                ),
                trust_env=False,  # a loopback store must not go through HTTP(S)_PROXY
                verify=self._ssl_setting(),
                transport=transport,
            )
            self._http_owner = owner
            # [transport seam] over our aiohttp transport a call skips httpx's Request/Response
            # objects and AsyncClient.send (half of the client's CPU per call, measured)
            self._send = self._send_httpx if transport is None else transport.post
        return self._http

    def _ssl_setting(self) -> bool | ssl.SSLContext:
        # TLS settings only matter for https; for http, skip loading the CA bundle (20-200 ms
        # of every runner process's start-up, measured by benchmarks/report.py figure 3)
        if not self._https:
            return False
        if self._ssl is None:
            self._ssl = _tls.ssl_context_of(self.verify)
        return self._ssl

    @property
    def _https(self) -> bool:
        return self.endpoint.lower().startswith("https:")

    async def _tls_failure(self, name: str, exc: Exception, tries: int) -> StoreTLSError | None:
        """The error to raise at once when ``exc`` is a TLS misconfiguration (see the module
        docstring), else ``None``. Only the first failed try of a plain-HTTP call is probed
        (one extra connection) for a port that speaks TLS."""
        why = _tls.describe_tls_failure(exc)
        if why is None and not self._https and tries == 1 and isinstance(exc, httpx.RemoteProtocolError):
            url = httpx.URL(self.endpoint)
            if await _tls.speaks_tls(url.host, url.port or 80, self.connect_timeout):
                https = "https" + self.endpoint[len("http") :]
                why = f"the server speaks HTTPS on this port: use {https} (and verify= for its CA)"
        if why is None:
            return None
        return StoreTLSError(f"TLS with the LightningStoreServer at {self.endpoint} failed ({name}): {why}")

    async def close(self) -> None:
        """Close the connection pool of this process/loop (the client can be used again later)."""
        http, owner = self._http, self._http_owner
        self._http = self._http_owner = None
        if http is not None and owner is not None and owner[0] == os.getpid():
            try:
                same_loop = owner[1] is loop_identity()
            except Exception:
                same_loop = False
            if same_loop:
                await http.aclose()

    async def __aenter__(self) -> LightningStoreClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ one call
    async def _call(self, spec: p.Route[R], body: Any, *, wait: float | None = 0.0) -> R:
        """POST ``body`` to the route and decode its result.

        ``wait``: how long the server may legitimately take before answering (a long poll);
        ``None`` = without limit. The read timeout is that plus ``request_timeout``.
        """
        name = spec.name
        try:
            content = _encoder.encode(body)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise ValueError(f"{name}: arguments are not JSON-serialisable: {exc}") from None
        headers = self._headers
        if spec.mutating:
            headers = {**headers, p.IDEMPOTENCY_HEADER: os.urandom(16).hex()}
        if wait is None or math.isinf(wait):
            timeout = httpx.Timeout(None, connect=self.connect_timeout).as_dict()
        elif wait > 0:
            timeout = httpx.Timeout(self.request_timeout + wait, connect=self.connect_timeout).as_dict()
        else:
            timeout = self._timeout
        self._client()
        send = self._send
        url = self._url_text[name]
        delays = iter(self.retry_delays)
        tries = 0
        while True:
            tries += 1
            try:
                status, answer = await send(url, content, headers, timeout)
                break
            except _RETRYABLE as exc:
                if (tls_error := await self._tls_failure(name, exc, tries)) is not None:
                    raise tls_error from exc
                delay = next(delays, None)
                if delay is None:
                    raise StoreConnectionError(
                        f"cannot reach the LightningStoreServer at {self.endpoint} ({name}, {tries} tries): "
                        f"{type(exc).__name__}: {exc or 'connection failed'}"
                    ) from exc
                await anyio.sleep(delay)
            except httpx.TimeoutException as exc:
                raise StoreConnectionError(
                    f"the LightningStoreServer at {self.endpoint} did not answer {name} in time: "
                    f"{type(exc).__name__}"
                ) from exc
        if status == 204:  # a claim refused because the run is over (LightningStoreServer.end_run)
            if not self.run_over:
                self.run_over = True
                logger.info("the LightningStoreServer at %s says the run is over", self.endpoint)
            return None  # type: ignore[return-value]  # only the dequeue routes answer 204
        if status == 200:
            result: R = _decoders[name].decode(answer)
            return result
        detail = _error_detail(status, answer)
        if status in (401, 403):
            raise StoreAuthError(f"the LightningStoreServer at {self.endpoint} refused {name}: {detail}")
        if 400 <= status < 500:
            raise ValueError(detail)
        raise RuntimeError(
            f"the LightningStoreServer at {self.endpoint} failed {name} (HTTP {status}): {detail}"
        )

    async def _send_httpx(
        self, url: str, content: bytes, headers: dict[str, str], timeout: dict[str, float | None]
    ) -> tuple[int, bytes]:
        """One POST through httpx's own client (trio, TLS, ``AGL_HTTP_TRANSPORT=httpx``).

        Built directly rather than through ``post()``: skips URL/header/cookie merging (~10% of
        the client's CPU per call, measured). The timeout travels in the request's extensions,
        as ``build_request`` would put it."""
        assert self._http is not None
        request = httpx.Request(
            "POST", url, content=content, headers=headers, extensions={"timeout": timeout}
        )
        response = await self._http.send(request)
        return response.status_code, response.content

    async def health(self) -> bool:
        """Whether the server answers its health check (one request, no retries)."""
        try:
            response = await self._client().get(f"{p.API_PREFIX}/health")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    # ------------------------------------------------------------------ the special routes
    async def dequeue_rollout(
        self, worker_id: WorkerId | None = None, *, timeout: float | None = None
    ) -> AttemptedRollout | None:
        body = p.DEQUEUE_ROLLOUT.body(worker_id=worker_id, timeout=timeout)
        return await self._call(p.DEQUEUE_ROLLOUT, body, wait=_wait_of(timeout, none_waits=False))

    async def finish_and_dequeue(
        self,
        rollout_id: str,
        attempt_id: str,
        status: AttemptStatus = "succeeded",
        *,
        worker_id: WorkerId | None = None,
        timeout: float | None = None,
    ) -> AttemptedRollout | None:
        """One request: end the attempt and claim the next rollout (see ``LightningStore``)."""
        body = p.FINISH_AND_DEQUEUE.body(
            rollout_id=rollout_id, attempt_id=attempt_id, status=status, worker_id=worker_id, timeout=timeout
        )
        return await self._call(p.FINISH_AND_DEQUEUE, body, wait=_wait_of(timeout, none_waits=False))

    async def wait_for_rollouts(
        self, *, rollout_ids: list[str], timeout: float | None = None
    ) -> list[Rollout]:
        body = p.WAIT_FOR_ROLLOUTS.body(rollout_ids=list(rollout_ids), timeout=timeout)
        return await self._call(p.WAIT_FOR_ROLLOUTS, body, wait=_wait_of(timeout, none_waits=True))

    async def add_span(self, span: Span) -> Span | None:
        return await self._call(p.ADD_SPAN, _as_span(span))

    # ------------------------------------------------------------------ every other route
    enqueue_rollout = _remote(LightningStore.enqueue_rollout)
    enqueue_many_rollouts = _remote(LightningStore.enqueue_many_rollouts)
    dequeue_many_rollouts = _remote(LightningStore.dequeue_many_rollouts)
    start_rollout = _remote(LightningStore.start_rollout)
    start_attempt = _remote(LightningStore.start_attempt)
    update_rollout = _remote(LightningStore.update_rollout)
    update_attempt = _remote(LightningStore.update_attempt)
    get_rollout_by_id = _remote(LightningStore.get_rollout_by_id)
    query_rollouts = _remote(LightningStore.query_rollouts)
    query_attempts = _remote(LightningStore.query_attempts)
    get_latest_attempt = _remote(LightningStore.get_latest_attempt)
    add_many_spans = _remote(LightningStore.add_many_spans)
    query_spans = _remote(LightningStore.query_spans)
    get_next_span_sequence_id = _remote(LightningStore.get_next_span_sequence_id)
    add_resources = _remote(LightningStore.add_resources)
    update_resources = _remote(LightningStore.update_resources)
    get_latest_resources = _remote(LightningStore.get_latest_resources)
    get_resources_by_id = _remote(LightningStore.get_resources_by_id)
    query_resources = _remote(LightningStore.query_resources)
    query_workers = _remote(LightningStore.query_workers)
    get_worker_by_id = _remote(LightningStore.get_worker_by_id)
    update_worker = _remote(LightningStore.update_worker)
    statistics = _remote(LightningStore.statistics)


def _wait_of(timeout: float | None, *, none_waits: bool) -> float | None:
    """How long the server may wait before answering, from a store call's ``timeout``."""
    if timeout is None:
        return None if none_waits else 0.0
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValueError(f"timeout must be a number or None, got {timeout!r}")
    return max(float(timeout), 0.0)


#: ``send(url, content, headers, timeout) -> (status, body)``: one POST (raises httpx's exceptions).
_Send = Callable[[str, bytes, dict[str, str], dict[str, float | None]], Awaitable[tuple[int, bytes]]]


async def _not_connected(
    url: str, content: bytes, headers: dict[str, str], timeout: dict[str, float | None]
) -> tuple[int, bytes]:
    raise RuntimeError("LightningStoreClient: _client() must run before a request is sent")


def _error_detail(status: int, body: bytes) -> str:
    """The server's error message from a non-200 answer (its JSON body, else the raw text)."""
    try:
        return _error_decoder.decode(body).detail
    except msgspec.MsgspecError:
        pass
    text = body.decode("utf-8", "replace").strip()
    if text:
        return text
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"

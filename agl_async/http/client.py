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

    The server's 400/404/413/422 answers are raised as ``ValueError`` with the server's message
    (exactly what the in-process store raises); 401/403 as :class:`StoreAuthError`
    (a ``PermissionError``); other answers as ``RuntimeError`` naming the endpoint.

Idempotency
    Every mutating call sends an ``Idempotency-Key`` header, the same on each of its retries; the
    server replays its first answer to a repeated key, so a retry after a lost response never
    enqueues, claims or stores anything twice.

Cancellation
    Cancelling a call abandons its request (the connection is closed). The server notices the
    disconnect during long polls and claims nothing for it; a short mutating request already
    received by the server may still be applied.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from http import HTTPStatus
from types import TracebackType
from typing import Any, Literal, TypeVar

import anyio
import httpx
import msgspec

from ..store.base import UNSET, EnqueueRolloutRequest, LightningStore, Unset, _as_enqueue_requests
from ..types import (
    Attempt,
    AttemptedRollout,
    AttemptStatus,
    ResourcesUpdate,
    Rollout,
    RolloutConfig,
    RolloutMode,
    RolloutStatus,
    Span,
    Worker,
    WorkerId,
    WorkerStatus,
)
from . import protocol as p
from .transport import TRANSPORTS, AiohttpTransport, TransportName, resolve_transport  # [transport seam]

__all__ = ["DEFAULT_RETRY_DELAYS", "LightningStoreClient", "StoreAuthError", "StoreConnectionError"]

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

T = TypeVar("T")
_encoder = msgspec.json.Encoder()
_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    name: msgspec.json.Decoder(spec.result) for name, spec in p.ROUTES.items()
}
_error_decoder = msgspec.json.Decoder(p.ErrorBody)


class StoreConnectionError(ConnectionError):
    """The store server could not be reached (after the retries) or did not answer in time."""


class StoreAuthError(PermissionError):
    """The store server refused the request's credentials (401/403)."""


def _m(value: Any) -> Any:
    """The store's ``UNSET`` -> msgspec's (an absent field on the wire)."""
    return msgspec.UNSET if isinstance(value, Unset) else value


def _loop_token() -> object:
    """Identity of the running event loop (asyncio loop or trio run)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        import trio

        return trio.lowlevel.current_root_task()


def _as_config(config: Any) -> RolloutConfig | None:
    if config is None or isinstance(config, RolloutConfig):
        return config
    if isinstance(config, Mapping):
        try:
            return RolloutConfig(**config)
        except TypeError as exc:
            raise ValueError(f"invalid rollout config {dict(config)!r}: {exc}") from None
    raise ValueError(f"config must be a RolloutConfig, a mapping or None, got {type(config).__name__}")


class LightningStoreClient(LightningStore):
    """Talk to a ``LightningStoreServer`` at ``endpoint`` (e.g. ``"http://127.0.0.1:4747"``).

    ``auth_token`` (default: env ``AGL_SERVER_TOKEN``; ``""`` sends none) is sent as a bearer
    token. ``request_timeout`` bounds each request that does not wait by design;
    ``connect_timeout`` each connection attempt; ``retry_delays`` the retries (see the module
    docstring). ``max_connections`` caps the pool (concurrent requests of this client).
    ``transport``: what carries the requests under httpx's API — ``"auto"`` (aiohttp's pool on
    asyncio for ``http://``, else httpx's), ``"httpx"`` or ``"aiohttp"``
    (:mod:`agl_async.http.transport`).
    """

    def __init__(
        self,
        endpoint: str,
        auth_token: str | None = None,
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
        self.request_timeout = float(request_timeout)
        self.connect_timeout = float(connect_timeout)
        self.retry_delays = tuple(float(d) for d in retry_delays)
        self.max_connections = int(max_connections)
        self._http: httpx.AsyncClient | None = None
        self._send: _Send = _not_connected
        self._http_owner: tuple[int, object] | None = None
        self._headers = {"content-type": "application/json"}
        if self.auth_token:
            self._headers["authorization"] = f"Bearer {self.auth_token}"
        self._timeout = httpx.Timeout(self.request_timeout, connect=self.connect_timeout).as_dict()
        self._url_text = {name: self.endpoint + spec.path for name, spec in p.ROUTES.items()}

    def __repr__(self) -> str:
        return f"LightningStoreClient({self.endpoint!r})"

    # ------------------------------------------------------------------ pickling: config only
    def __getstate__(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "auth_token": self.auth_token,
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
            request_timeout=state["request_timeout"],
            connect_timeout=state["connect_timeout"],
            retry_delays=state["retry_delays"],
            max_connections=state["max_connections"],
            transport=state.get("transport", "auto"),
        )

    # ------------------------------------------------------------------ connection pool
    def _client(self) -> httpx.AsyncClient:
        owner = (os.getpid(), _loop_token())
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
                # TLS settings only matter for https; for http, skip loading the CA bundle (20-200 ms
                # of every runner process's start-up, measured by benchmarks/report.py figure 3)
                verify=not self.endpoint.lower().startswith("http:"),
                transport=transport,
            )
            self._http_owner = owner
            # [transport seam] over our aiohttp transport a call skips httpx's Request/Response
            # objects and AsyncClient.send (half of the client's CPU per call, measured)
            self._send = self._send_httpx if transport is None else transport.post
        return self._http

    async def close(self) -> None:
        """Close the connection pool of this process/loop (the client can be used again later)."""
        http, owner = self._http, self._http_owner
        self._http = self._http_owner = None
        if http is not None and owner is not None and owner[0] == os.getpid():
            try:
                same_loop = owner[1] is _loop_token()
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
    async def _call(self, name: str, body: Any, *, wait: float | None = 0.0) -> Any:
        """POST ``body`` to the method's route and decode its result.

        ``wait``: how long the server may legitimately take before answering (a long poll);
        ``None`` = without limit. The read timeout is that plus ``request_timeout``.
        """
        spec = p.ROUTES[name]
        try:
            content = _encoder.encode(body)
        except (TypeError, ValueError, OverflowError) as exc:
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
        if status == 200:
            return _decoders[name].decode(answer)
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

    # ------------------------------------------------------------------ rollouts and the queue
    async def enqueue_rollout(
        self,
        input: Any,
        mode: RolloutMode | None = None,
        resources_id: str | None = None,
        config: RolloutConfig | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Rollout:
        body = p.EnqueueRolloutBody(
            input=input, mode=mode, resources_id=resources_id, config=_as_config(config), metadata=metadata
        )
        result: Rollout = await self._call("enqueue_rollout", body)
        return result

    async def enqueue_many_rollouts(
        self, rollouts: Sequence[EnqueueRolloutRequest | Mapping[str, Any]]
    ) -> list[Rollout]:
        items = [
            p.EnqueueRolloutBody(
                input=r.input,
                mode=r.mode,
                resources_id=r.resources_id,
                config=_as_config(r.config),
                metadata=r.metadata,
            )
            for r in _as_enqueue_requests(rollouts)
        ]
        result: list[Rollout] = await self._call("enqueue_many_rollouts", p.EnqueueManyBody(rollouts=items))
        return result

    async def dequeue_rollout(
        self, worker_id: WorkerId | None = None, *, timeout: float | None = None
    ) -> AttemptedRollout | None:
        result: AttemptedRollout | None = await self._call(
            "dequeue_rollout",
            p.DequeueBody(worker_id=worker_id, timeout=timeout),
            wait=_wait_of(timeout, none_waits=False),
        )
        return result

    async def dequeue_many_rollouts(
        self, *, limit: int = 1, worker_id: WorkerId | None = None
    ) -> list[AttemptedRollout]:
        result: list[AttemptedRollout] = await self._call(
            "dequeue_many_rollouts", p.DequeueManyBody(limit=limit, worker_id=worker_id)
        )
        return result

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
        body = p.FinishAndDequeueBody(
            rollout_id=rollout_id, attempt_id=attempt_id, status=status, worker_id=worker_id, timeout=timeout
        )
        result: AttemptedRollout | None = await self._call(
            "finish_and_dequeue", body, wait=_wait_of(timeout, none_waits=False)
        )
        return result

    async def start_rollout(
        self,
        input: Any,
        mode: RolloutMode | None = None,
        resources_id: str | None = None,
        config: RolloutConfig | None = None,
        metadata: dict[str, Any] | None = None,
        worker_id: WorkerId | None = None,
    ) -> AttemptedRollout:
        body = p.StartRolloutBody(
            input=input,
            mode=mode,
            resources_id=resources_id,
            config=_as_config(config),
            metadata=metadata,
            worker_id=worker_id,
        )
        result: AttemptedRollout = await self._call("start_rollout", body)
        return result

    async def start_attempt(self, rollout_id: str, worker_id: WorkerId | None = None) -> AttemptedRollout:
        result: AttemptedRollout = await self._call(
            "start_attempt", p.StartAttemptBody(rollout_id=rollout_id, worker_id=worker_id)
        )
        return result

    async def update_rollout(
        self,
        rollout_id: str,
        input: Any | Unset = UNSET,
        mode: RolloutMode | Unset | None = UNSET,
        resources_id: str | Unset | None = UNSET,
        status: RolloutStatus | Unset = UNSET,
        config: RolloutConfig | Unset = UNSET,
        metadata: dict[str, Any] | Unset | None = UNSET,
    ) -> Rollout:
        body = p.UpdateRolloutBody(
            rollout_id=rollout_id,
            input=_m(input),
            mode=_m(mode),
            resources_id=_m(resources_id),
            status=_m(status),
            config=msgspec.UNSET if isinstance(config, Unset) else _as_config(config),  # type: ignore[arg-type]
            metadata=_m(metadata),
        )
        result: Rollout = await self._call("update_rollout", body)
        return result

    async def update_attempt(
        self,
        rollout_id: str,
        attempt_id: str | Literal["latest"],
        status: AttemptStatus | Unset = UNSET,
        worker_id: WorkerId | Unset | None = UNSET,
        last_heartbeat_time: float | Unset = UNSET,
        metadata: dict[str, Any] | Unset | None = UNSET,
    ) -> Attempt:
        body = p.UpdateAttemptBody(
            rollout_id=rollout_id,
            attempt_id=attempt_id,
            status=_m(status),
            worker_id=_m(worker_id),
            last_heartbeat_time=_m(last_heartbeat_time),
            metadata=_m(metadata),
        )
        result: Attempt = await self._call("update_attempt", body)
        return result

    async def wait_for_rollouts(
        self, *, rollout_ids: list[str], timeout: float | None = None
    ) -> list[Rollout]:
        result: list[Rollout] = await self._call(
            "wait_for_rollouts",
            p.WaitForRolloutsBody(rollout_ids=list(rollout_ids), timeout=timeout),
            wait=_wait_of(timeout, none_waits=True),
        )
        return result

    async def get_rollout_by_id(self, rollout_id: str) -> Rollout | None:
        result: Rollout | None = await self._call("get_rollout_by_id", p.RolloutIdBody(rollout_id=rollout_id))
        return result

    async def query_rollouts(
        self,
        *,
        status_in: Sequence[RolloutStatus] | None = None,
        rollout_id_in: Sequence[str] | None = None,
    ) -> list[Rollout]:
        body = p.QueryRolloutsBody(
            status_in=None if status_in is None else list(status_in),
            rollout_id_in=None if rollout_id_in is None else list(rollout_id_in),
        )
        result: list[Rollout] = await self._call("query_rollouts", body)
        return result

    async def query_attempts(self, rollout_id: str) -> list[Attempt]:
        result: list[Attempt] = await self._call("query_attempts", p.RolloutIdBody(rollout_id=rollout_id))
        return result

    async def get_latest_attempt(self, rollout_id: str) -> Attempt | None:
        result: Attempt | None = await self._call(
            "get_latest_attempt", p.RolloutIdBody(rollout_id=rollout_id)
        )
        return result

    # ------------------------------------------------------------------ spans
    async def add_span(self, span: Span) -> Span | None:
        if not isinstance(span, Span):
            raise ValueError(f"expected a Span, got {type(span).__name__}")
        result: Span | None = await self._call("add_span", span)
        return result

    async def add_many_spans(self, spans: Sequence[Span]) -> list[Span]:
        for span in spans:
            if not isinstance(span, Span):
                raise ValueError(f"expected a Span, got {type(span).__name__}")
        result: list[Span] = await self._call("add_many_spans", p.AddManySpansBody(spans=list(spans)))
        return result

    async def query_spans(self, rollout_id: str, attempt_id: str | None = None) -> list[Span]:
        result: list[Span] = await self._call(
            "query_spans", p.QuerySpansBody(rollout_id=rollout_id, attempt_id=attempt_id)
        )
        return result

    async def get_next_span_sequence_id(self, rollout_id: str, attempt_id: str) -> int:
        result: int = await self._call(
            "get_next_span_sequence_id", p.SpanSequenceBody(rollout_id=rollout_id, attempt_id=attempt_id)
        )
        return result

    # ------------------------------------------------------------------ resources
    async def add_resources(self, resources: Mapping[str, Any]) -> ResourcesUpdate:
        result: ResourcesUpdate = await self._call(
            "add_resources", p.AddResourcesBody(resources=_as_resources(resources))
        )
        return result

    async def update_resources(self, resources_id: str, resources: Mapping[str, Any]) -> ResourcesUpdate:
        body = p.UpdateResourcesBody(resources_id=resources_id, resources=_as_resources(resources))
        result: ResourcesUpdate = await self._call("update_resources", body)
        return result

    async def get_latest_resources(self) -> ResourcesUpdate | None:
        result: ResourcesUpdate | None = await self._call("get_latest_resources", p.NoArgs())
        return result

    async def get_resources_by_id(self, resources_id: str) -> ResourcesUpdate | None:
        result: ResourcesUpdate | None = await self._call(
            "get_resources_by_id", p.ResourcesIdBody(resources_id=resources_id)
        )
        return result

    async def query_resources(self) -> list[ResourcesUpdate]:
        result: list[ResourcesUpdate] = await self._call("query_resources", p.NoArgs())
        return result

    # ------------------------------------------------------------------ workers
    async def query_workers(self, *, status_in: Sequence[WorkerStatus] | None = None) -> list[Worker]:
        body = p.QueryWorkersBody(status_in=None if status_in is None else list(status_in))
        result: list[Worker] = await self._call("query_workers", body)
        return result

    async def get_worker_by_id(self, worker_id: WorkerId) -> Worker | None:
        result: Worker | None = await self._call("get_worker_by_id", p.WorkerIdBody(worker_id=worker_id))
        return result

    async def update_worker(
        self, worker_id: WorkerId, heartbeat_stats: dict[str, Any] | Unset = UNSET
    ) -> Worker:
        body = p.UpdateWorkerBody(worker_id=worker_id, heartbeat_stats=_m(heartbeat_stats))
        result: Worker = await self._call("update_worker", body)
        return result

    # ------------------------------------------------------------------ misc
    async def statistics(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("statistics", p.NoArgs())
        return result


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


def _wait_of(timeout: float | None, *, none_waits: bool) -> float | None:
    """How long the server may wait before answering, from a store call's ``timeout``."""
    if timeout is None:
        return None if none_waits else 0.0
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValueError(f"timeout must be a number or None, got {timeout!r}")
    return max(float(timeout), 0.0)


def _as_resources(resources: Any) -> dict[str, Any]:
    if not isinstance(resources, Mapping):
        raise ValueError(f"resources must be a mapping of names to values, got {type(resources).__name__}")
    return dict(resources)

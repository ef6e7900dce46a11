"""``RayExecutionStrategy``: the algorithm and the store server here, the runners as Ray actors.

Needs the ``ray`` extra (``pip install 'agl-async[ray]'``); this module is imported only when the
strategy is used (``Trainer(strategy="ray")``, ``{"type": "ray", ...}``, or an explicit import).

One run:

1. **Ray.** If this process is not connected to Ray yet, ``ray.init(address, **init_options)``
   connects to the cluster at ``address`` (``None``: the one Ray finds — ``RAY_ADDRESS`` or the
   last ``ray start`` on this machine — else a new local instance); that session is shut down
   (``ray.shutdown()``, which also stops a local instance it started) when ``execute`` ends. A
   session the caller opened is used and left open.
2. **Store server** (``managed_store``, the default): :class:`~agl_async.http.server.LightningStoreServer`
   serves ``store`` from this process on ``server_host:server_port``. ``server_host`` ``None``
   means env ``AGL_SERVER_HOST``, else ``127.0.0.1`` when every node of the cluster is this
   machine, else this node's address as Ray knows it. The actors are told the endpoint (a bind to
   ``0.0.0.0`` / ``::`` is advertised as this node's address). Bound to an address that is not
   loopback and given no ``auth_token`` (nor env ``AGL_SERVER_TOKEN``), the server gets a fresh
   random token for the run, which only the actors receive (``server_token`` while it runs).
   ``managed_store=False`` (env ``AGL_MANAGED_STORE``): no server; ``store`` itself is pickled
   to the actors and handed to the algorithm.
3. **Algorithm** here, as a task of the caller's loop (asyncio: uvicorn and Ray's futures).
4. **Runner actors**: ``n_runners`` async actors (:mod:`agl_async.execution.ray_fleet`), each
   created with ``runner_options`` (e.g. ``{"num_cpus": 1}``) and ``max_restarts``, each running
   the runner bundle (worker id 0 … n-1) against a ``LightningStoreClient`` of the server.

Shutdown, once the algorithm returns, anything fails, or the caller cancels (Ctrl-C under
:meth:`run`): the event is set (and the server answers long polls at once), every actor is asked
to stop, ``graceful_timeout``; ``ray.cancel`` of the runners still going, ``terminate_timeout``;
``ray.kill``, ``terminate_timeout``. Every actor of the run is then killed and confirmed dead before
the server stops; no actor outlives ``execute``.

Errors: the first one is re-raised as itself — a bundle's exception raised inside an actor comes
back as the original exception (Ray's wrapper is removed). An actor whose process dies is restarted
by Ray up to ``max_restarts`` times and its runner started again (the attempts it had in flight
are recovered by the store's watchdog, ``RolloutConfig.unresponsive_seconds``); an actor lost past
that is a ``RuntimeError`` naming it.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio

try:
    import ray
except ImportError as exc:  # pragma: no cover - exercised in environments without Ray
    raise ImportError(
        "RayExecutionStrategy needs Ray: install the extra with pip install 'agl-async[ray]'"
    ) from exc

from .._backend import running_asyncio_loop
from .._net import is_loopback
from .._validate import check_count, check_seconds
from ..http._tls import Verify, check_verify
from ..http.server import LightningStoreServer
from ..store.base import LightningStore
from ._env import env_bool, env_str
from .base import AlgorithmBundle, ExecutionStrategy, RunnerBundle
from .events import ThreadingExecutionEvent
from .ray_actor import StoreSpec
from .ray_fleet import RunnerFleet, check_runner_options
from .supervision import Supervisor

__all__ = ["RayExecutionStrategy", "ray_session", "run_runner_actors"]

logger = logging.getLogger("agl_async.execution.ray")

# Parts of Ray's API are untyped: calls go through this alias, so that mypy --strict passes the
# same with Ray installed and without it (where ``ray`` is Any anyway).
_ray: Any = ray


def _require_asyncio(what: str) -> None:
    if running_asyncio_loop() is None:
        raise RuntimeError(
            f"{what} needs asyncio (Ray's object references are asyncio futures; the store server "
            "is uvicorn); use anyio.run(..., backend='asyncio') or run()"
        )


def _options(name: str, options: Mapping[str, Any] | None, reserved: tuple[str, ...]) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"{name} must be a mapping of keyword arguments, got {options!r}")
    taken = [key for key in reserved if key in options]
    if taken:
        raise ValueError(f"{name} may not set {', '.join(taken)}: the strategy sets it")
    return dict(options)


def _dumps(what: str, obj: Any) -> bytes:
    """``obj`` pickled with Ray's cloudpickle, or ``TypeError`` naming ``what``."""
    try:
        data: bytes = _ray.cloudpickle.dumps(obj)
    except Exception as exc:
        raise TypeError(f"the {what} must pickle to reach the Ray actors: {exc}") from exc
    return data


# ---------------------------------------------------------------------------- the Ray session
class _Session:
    """Reference-counted ownership of a ``ray.init`` made by agl_async in this process."""

    lock = threading.Lock()
    users = 0
    owned = False


def _enter_session(address: str | None, init_options: Mapping[str, Any]) -> bool:
    with _Session.lock:
        if _Session.users == 0 and not ray.is_initialized():
            ray.init(address=address, **{"include_dashboard": False, **init_options})
            _Session.owned = True
            logger.info("Ray session opened (address=%r)", address)
        _Session.users += 1
        return _Session.owned


def _exit_session() -> None:
    with _Session.lock:
        _Session.users -= 1
        if _Session.users == 0 and _Session.owned:
            _Session.owned = False
            ray.shutdown()
            logger.info("Ray session closed")


@asynccontextmanager
async def ray_session(
    address: str | None = None, init_options: Mapping[str, Any] | None = None
) -> AsyncIterator[bool]:
    """Be connected to Ray inside the block; yields whether agl_async opened the session (and so
    closes it — ``ray.shutdown()`` — when the last such block exits). A session the caller opened
    with ``ray.init`` is used as it is. Opening and closing run in a worker thread (they block for
    seconds) and are not interrupted by a cancellation."""
    with anyio.CancelScope(shield=True):
        owned = await anyio.to_thread.run_sync(_enter_session, address, dict(init_options or {}))
    try:
        yield owned
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_exit_session)


def _cluster_is_this_machine() -> bool:
    here = _ray.util.get_node_ip_address()
    nodes = [n for n in _ray.nodes() if n.get("Alive")]
    return all(n.get("NodeManagerAddress") == here for n in nodes)


# ---------------------------------------------------------------------------- the strategy
class RayExecutionStrategy(ExecutionStrategy):
    """Store server and algorithm here, runners as Ray actors. See the module docstring.

    Beyond the contract's parameters: ``auth_token`` (the server's bearer token; None: env
    ``AGL_SERVER_TOKEN``, else generated when the server is not on loopback; ``""``: none);
    section 9's ``ssl_certfile`` / ``ssl_keyfile`` (the server serves HTTPS), ``verify`` (how the
    actors check it: a CA path, which travels to them; an ``ssl.SSLContext`` does not pickle) and
    ``allow_unauthenticated``; ``server_options`` / ``client_options`` (any other keyword
    arguments of ``LightningStoreServer`` / the actors' ``LightningStoreClient``) and
    ``init_options`` (extra keyword arguments of ``ray.init`` when the strategy opens the session,
    e.g. ``{"num_cpus": 4}`` or a ``runtime_env``).
    """

    alias = "ray"

    def __init__(
        self,
        n_runners: int = 1,
        *,
        address: str | None = None,
        server_host: str | None = None,
        server_port: int = 0,
        runner_options: Mapping[str, Any] | None = None,
        max_restarts: int = 0,
        graceful_timeout: float = 10.0,
        terminate_timeout: float = 10.0,
        managed_store: bool | None = None,
        auth_token: str | None = None,
        ssl_certfile: str | os.PathLike[str] | None = None,
        ssl_keyfile: str | os.PathLike[str] | None = None,
        verify: Verify = True,
        allow_unauthenticated: bool = False,
        server_options: Mapping[str, Any] | None = None,
        client_options: Mapping[str, Any] | None = None,
        init_options: Mapping[str, Any] | None = None,
    ) -> None:
        check_count(n_runners, "n_runners")
        if address is not None and not isinstance(address, str):
            raise ValueError(f"address must be a Ray address string or None, got {address!r}")
        if isinstance(server_port, bool) or not isinstance(server_port, int) or not 0 <= server_port <= 65535:
            raise ValueError(f"server_port must be an integer in 0..65535, got {server_port!r}")
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < -1:
            raise ValueError(f"max_restarts must be an integer >= 0 (or -1: unlimited), got {max_restarts!r}")
        check_seconds(graceful_timeout, "graceful_timeout", optional=False)
        check_seconds(terminate_timeout, "terminate_timeout", optional=False)
        self.ssl_certfile, self.ssl_keyfile = ssl_certfile, ssl_keyfile
        self.verify = check_verify(verify)
        self.allow_unauthenticated = bool(allow_unauthenticated)
        self.server_options = _options(
            "server_options",
            server_options,
            ("store", "host", "port", "auth_token", "ssl_certfile", "ssl_keyfile", "allow_unauthenticated"),
        )
        self.client_options = _options("client_options", client_options, ("endpoint", "auth_token", "verify"))
        self.init_options = _options("init_options", init_options, ("address",))
        self.n_runners = n_runners
        self.address = address
        self.server_host = (
            server_host if server_host is not None else env_str("AGL_SERVER_HOST", None, "") or None
        )
        self.server_port = server_port
        self.runner_options = check_runner_options(runner_options)
        self.max_restarts = max_restarts
        self.graceful_timeout = float(graceful_timeout)
        self.terminate_timeout = float(terminate_timeout)
        self.managed_store = env_bool("AGL_MANAGED_STORE", "managed_store", managed_store, True)
        self.auth_token = auth_token
        self.server_endpoint: str | None = None
        """The endpoint the actors of the run in progress use (None outside a run)."""
        self.server_token: str | None = None
        """The bearer token of the run in progress (None outside a run or without one)."""

    def __repr__(self) -> str:
        return (
            f"RayExecutionStrategy(n_runners={self.n_runners}, address={self.address!r}, "
            f"server_host={self.server_host!r}, server_port={self.server_port}, "
            f"runner_options={self.runner_options!r}, max_restarts={self.max_restarts}, "
            f"managed_store={self.managed_store})"
        )

    async def execute(self, algorithm: AlgorithmBundle, runner: RunnerBundle, store: LightningStore) -> None:
        """One whole run (see the module docstring); asyncio only."""
        _require_asyncio("RayExecutionStrategy")
        runner_bytes = _dumps("runner bundle", runner)
        store_spec: StoreSpec | None = None
        _dumps(
            "verify and client_options (an ssl.SSLContext does not pickle: pass a CA path)",
            self._client_spec("", ""),
        )
        if not self.managed_store:
            store_spec = ("store", _dumps("store (managed_store=False hands it to the actors)", store))
        logger.info("Ray run: %r", self)
        async with ray_session(self.address, self.init_options):
            if store_spec is not None:
                await self._supervise(algorithm, store, runner_bytes, store_spec, None)
            else:
                # Serving for the block; stopped gracefully once every actor is gone.
                async with self._server(store) as server:  # OSError naming host:port: no actor yet
                    try:
                        await self._supervise(
                            algorithm, server, runner_bytes, self._advertise(server), server
                        )
                    finally:
                        self.server_endpoint = self.server_token = None
        logger.info("Ray run finished")

    def _server(self, store: LightningStore) -> LightningStoreServer:
        host = self.server_host
        if host is None:
            host = "127.0.0.1" if _cluster_is_this_machine() else _ray.util.get_node_ip_address()
        token = self.auth_token if self.auth_token is not None else env_str("AGL_SERVER_TOKEN", None, "")
        if self.auth_token is None and not token and not is_loopback(host):
            token = secrets.token_urlsafe(32)
            logger.info("the store server binds %s: requiring a token generated for this run", host)
        return LightningStoreServer(
            store,
            host,
            self.server_port,
            auth_token=token,
            ssl_certfile=self.ssl_certfile,
            ssl_keyfile=self.ssl_keyfile,
            allow_unauthenticated=self.allow_unauthenticated,
            **self.server_options,
        )

    def _advertise(self, server: LightningStoreServer) -> StoreSpec:
        """How the actors reach ``server`` (bound and serving): its endpoint, a wildcard bind
        replaced by this node's address, and its token."""
        endpoint = server.endpoint
        if server.host in ("0.0.0.0", "::"):
            node = _ray.util.get_node_ip_address()
            scheme = endpoint.partition("://")[0]
            endpoint = f"{scheme}://{f'[{node}]' if ':' in node else node}:{server.port}"
        token = server.auth_token or ""
        self.server_endpoint, self.server_token = endpoint, token or None
        logger.info("store server for the runner actors at %s", endpoint)
        return ("client", self._client_spec(endpoint, token))

    def _client_spec(self, endpoint: str, token: str) -> dict[str, Any]:
        return {**self.client_options, "endpoint": endpoint, "auth_token": token, "verify": self.verify}

    async def _supervise(
        self,
        algorithm: AlgorithmBundle,
        algorithm_store: LightningStore,
        runner_bytes: bytes,
        store_spec: StoreSpec,
        server: LightningStoreServer | None,
    ) -> None:
        event = ThreadingExecutionEvent()
        supervisor = Supervisor(event, self.graceful_timeout, "graceful_timeout")
        fleet = RunnerFleet(
            runner_bytes,
            store_spec,
            self.n_runners,
            event,
            runner_options=self.runner_options,
            max_restarts=self.max_restarts,
            graceful_timeout=self.graceful_timeout,
            terminate_timeout=self.terminate_timeout,
        )

        def algorithm_returned() -> None:
            logger.info("algorithm returned: stopping the runner actors")
            event.set()

        async def on_stop() -> None:
            await fleet.stop(on_signalled=server.end_long_polls if server is not None else None)

        supervisor.add_bundle("algorithm", algorithm, algorithm_store, event, on_return=algorithm_returned)
        supervisor.on_stop = on_stop
        try:
            fleet.start(supervisor)
            await supervisor.run()
        finally:
            with anyio.CancelScope(shield=True):
                await fleet.close()


# ---------------------------------------------------------------------------- runners only
async def run_runner_actors(
    runner: RunnerBundle,
    endpoint: str,
    n_runners: int,
    *,
    auth_token: str | None = None,
    address: str | None = None,
    runner_options: Mapping[str, Any] | None = None,
    max_restarts: int = 0,
    graceful_timeout: float = 10.0,
    terminate_timeout: float = 10.0,
    verify: Verify = True,
    client_options: Mapping[str, Any] | None = None,
    init_options: Mapping[str, Any] | None = None,
) -> None:
    """Place ``n_runners`` runner actors against the store server at ``endpoint`` (which the Ray
    nodes must reach) and wait until every runner has returned (``agl-async runner --ray N``).

    Cancelling it (Ctrl-C under the CLI) stops the actors with the strategy's escalation. The
    first error is re-raised as itself; an actor lost past ``max_restarts`` is a ``RuntimeError``
    naming it. No actor outlives the call."""
    _require_asyncio("run_runner_actors")
    check_count(n_runners, "n_runners")
    runner_bytes = _dumps("runner bundle", runner)
    options = _options("client_options", client_options, ("endpoint", "auth_token", "verify"))
    client = {**options, "endpoint": endpoint, "auth_token": auth_token or "", "verify": check_verify(verify)}
    _dumps("verify and client_options (an ssl.SSLContext does not pickle: pass a CA path)", client)
    spec: StoreSpec = ("client", client)
    async with ray_session(address, init_options):
        event = ThreadingExecutionEvent()
        supervisor = Supervisor(event, graceful_timeout, "graceful_timeout")
        fleet = RunnerFleet(
            runner_bytes,
            spec,
            n_runners,
            event,
            runner_options=runner_options,
            max_restarts=max_restarts,
            graceful_timeout=graceful_timeout,
            terminate_timeout=terminate_timeout,
        )
        supervisor.on_stop = fleet.stop
        try:
            fleet.start(supervisor)
            await supervisor.run()
        finally:
            with anyio.CancelScope(shield=True):
                await fleet.close()

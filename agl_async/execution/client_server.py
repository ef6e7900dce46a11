"""``ClientServerExecutionStrategy``: the algorithm and the runners in separate processes, over HTTP.

Roles (``role``, default env ``AGL_CURRENT_ROLE`` or ``"both"``):

* ``"algorithm"``: serve ``store`` with :class:`~agl_async.http.server.LightningStoreServer` on
  ``server_host:server_port`` and run the algorithm here against it. No runners.
* ``"runner"``: connect ``LightningStoreClient(f"http(s)://{host}:{port}")`` and run ``n_runners``
  runners — in this process when there is one, else one child process each — until they return.
* ``"both"``: server + algorithm here and ``n_runners`` runner processes; with
  ``main_process="runner"`` (one runner) the runner runs here and the algorithm + server in a
  child process (which therefore receives ``store``: it must pickle; changes made there stay
  there).

Across hosts (see docs/serving.md): ``auth_token`` (default env ``AGL_SERVER_TOKEN``),
``ssl_certfile`` / ``ssl_keyfile`` (the server here serves HTTPS), ``verify`` (how runners check
the server's certificate: httpx's convention, a CA bundle path crosses into runner processes),
``tls`` (runners use ``https://``; default: when a certificate or a CA bundle is given) and
``allow_unauthenticated`` (serve a non-loopback address without a token). Runner processes get
the token and the CA path inside their pickled client, never on a command line.

``managed_store=False``: no server or client is made; ``store`` itself goes to the bundles (and so
to the child processes, where it must pickle).

Bundles and stores that cross into a child are checked to pickle *before* anything is started
(``TypeError``); the server binds its port before any child is spawned, so a port in use is an
immediate ``OSError`` naming it.

Shutdown (after the algorithm side finishes, anything fails, or the caller cancels — Ctrl-C under
:meth:`run`): (1) set the event and wait ``graceful_timeout`` (in-process bundles still running
at that deadline are cancelled); (2) SIGINT the surviving children, wait ``terminate_timeout``;
(3) ``terminate()``, wait; (4) ``kill()``. The store server is stopped only after every runner
process has exited; in ``main_process="runner"`` mode the algorithm child keeps serving until
the runner here has finished. Every child is reaped before ``execute`` returns, and the
multiprocessing helpers started on the way (aiomultiprocess's manager, the resource tracker)
are shut down. A child exit code outside ``allowed_exit_codes`` stops the run and makes
``execute`` raise ``RuntimeError`` naming the child and the code, unless another error came
first (errors propagate as in shared-memory mode: the first one, as itself; a cancellation by the
caller wins over both).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal

import anyio

from .._backend import current_async_library
from .._net import bind_socket, free_port
from .._validate import check_count, check_seconds
from ..http._tls import Verify
from ..http.server import LightningStoreServer
from ..store.base import LightningStore
from ._env import env_bool, env_choice, env_int, env_str
from ._transport import Transport
from .base import AlgorithmBundle, ExecutionStrategy, RunnerBundle
from .events import ExecutionEvent, ProcessExecutionEvent, ThreadingExecutionEvent
from .processes import (
    DEFINE_AT_MODULE_LEVEL,
    Child,
    Lifeline,
    MultiprocessingHelpers,
    check_picklable,
    spawn,
)
from .shutdown import escalate
from .supervision import Supervisor

__all__ = ["ClientServerExecutionStrategy"]

logger = logging.getLogger("agl_async.execution.cs")

Role = Literal["algorithm", "runner", "both"]


# ---------------------------------------------------------------------------- child targets
async def _runner_child(
    runner: RunnerBundle, store: LightningStore, worker_id: int, event: ExecutionEvent, owns_store: bool
) -> None:
    try:
        await runner(store, worker_id, event)
    finally:
        if owns_store:  # the client made for this runner
            with anyio.CancelScope(shield=True):
                await store.close()


async def _algorithm_child(
    algorithm: AlgorithmBundle,
    store: LightningStore,
    host: str,
    port: int,
    managed: bool,
    event: ExecutionEvent,
    ready: ExecutionEvent,
    release: ExecutionEvent,
    transport: Transport,
) -> None:
    """``main_process="runner"``: serve ``store`` and run the algorithm; when it ends, set the
    event, and keep serving until the parent's runner has finished (``release``)."""
    try:
        async with _served(store, host, port, managed, transport) as served:
            ready.set()
            try:
                await algorithm(served, event)
            finally:
                event.set()
                if managed:
                    await release.wait()
    finally:
        event.set()


@contextlib.asynccontextmanager
async def _served(
    store: LightningStore, host: str, port: int, managed: bool, transport: Transport
) -> AsyncIterator[LightningStore]:
    """With ``managed``, serve ``store`` on ``host:port`` for the duration of the block (``async
    with`` the server: a task of a task group of this task) and yield the server; else yield
    ``store``. Binding fails at once (``OSError`` naming host:port) before the block runs. The
    server keeps serving while the block winds down, cancelled or not, and stops gracefully after."""
    if not managed:
        yield store
        return
    async with transport.server(store, host, port) as server:
        yield server


async def _first_of(*events: ExecutionEvent) -> None:
    async with anyio.create_task_group() as tg:

        async def wait_one(event: ExecutionEvent) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait_one, event)


class ClientServerExecutionStrategy(ExecutionStrategy):
    """Algorithm and runners in separate processes talking to one store over HTTP (asyncio only:
    the embedded server is uvicorn). Parameters and semantics: see the module docstring."""

    def __init__(
        self,
        role: Role | None = None,
        server_host: str | None = None,
        server_port: int | None = None,
        n_runners: int = 1,
        graceful_timeout: float = 10.0,
        terminate_timeout: float = 10.0,
        main_process: Literal["algorithm", "runner"] = "algorithm",
        managed_store: bool | None = None,
        allowed_exit_codes: Iterable[int] = (0, -15),
        *,
        auth_token: str | None = None,
        ssl_certfile: str | os.PathLike[str] | None = None,
        ssl_keyfile: str | os.PathLike[str] | None = None,
        verify: Verify = True,
        tls: bool | None = None,
        allow_unauthenticated: bool = False,
    ) -> None:
        self.role: Role = env_choice(  # type: ignore[assignment]
            "AGL_CURRENT_ROLE", "role", role, "both", ("algorithm", "runner", "both")
        )
        self.server_host = env_str("AGL_SERVER_HOST", server_host, "localhost")
        self.server_port = env_int("AGL_SERVER_PORT", "server_port", server_port, 4747)
        if not 0 <= self.server_port <= 65535:
            source = "server_port" if server_port is not None else "environment variable AGL_SERVER_PORT"
            raise ValueError(f"{source} must be in 0..65535, got {self.server_port}")
        check_count(n_runners, "n_runners")
        check_seconds(graceful_timeout, "graceful_timeout", optional=False)
        check_seconds(terminate_timeout, "terminate_timeout", optional=False)
        if main_process not in ("algorithm", "runner"):
            raise ValueError(f"main_process must be 'algorithm' or 'runner', got {main_process!r}")
        if main_process == "runner":
            if self.role != "both":
                raise ValueError(f"main_process='runner' requires role='both', got role={self.role!r}")
            if n_runners != 1:
                raise ValueError(f"main_process='runner' requires n_runners == 1, got n_runners={n_runners}")
        self.n_runners = n_runners
        self.graceful_timeout = float(graceful_timeout)
        self.terminate_timeout = float(terminate_timeout)
        self.main_process: Literal["algorithm", "runner"] = main_process
        self.managed_store = env_bool("AGL_MANAGED_STORE", "managed_store", managed_store, True)
        codes = tuple(allowed_exit_codes)
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
            raise ValueError(f"allowed_exit_codes must be integers, got {codes!r}")
        self.allowed_exit_codes = codes
        self._transport = Transport(
            auth_token=auth_token,
            ssl_certfile=ssl_certfile,
            ssl_keyfile=ssl_keyfile,
            verify=verify,
            tls=tls,
            allow_unauthenticated=allow_unauthenticated,
        )
        self.auth_token = self._transport.auth_token
        self.ssl_certfile = self._transport.ssl_certfile
        self.ssl_keyfile = self._transport.ssl_keyfile
        self.verify = self._transport.verify
        self.tls = self._transport.tls
        self.allow_unauthenticated = self._transport.allow_unauthenticated

    def __repr__(self) -> str:
        return (
            f"ClientServerExecutionStrategy(role={self.role!r}, server_host={self.server_host!r}, "
            f"server_port={self.server_port}, n_runners={self.n_runners}, "
            f"main_process={self.main_process!r}, managed_store={self.managed_store}, "
            f"tls={self.tls}, auth_token={'<set>' if self.auth_token else None})"
        )

    # ------------------------------------------------------------------ entry point
    async def execute(self, algorithm: AlgorithmBundle, runner: RunnerBundle, store: LightningStore) -> None:
        """Run this process's part of the run (see the module docstring); asyncio only."""
        logger.info("client-server run: %r", self)
        serves_here = self.managed_store and (
            self.role == "algorithm" or (self.role == "both" and self.main_process == "algorithm")
        )
        if serves_here and current_async_library() != "asyncio":
            raise RuntimeError(
                "ClientServerExecutionStrategy serves the store with uvicorn, which needs asyncio; "
                f"this loop runs {current_async_library()} (use anyio.run(..., backend='asyncio') or run())"
            )
        try:
            if self.role == "algorithm":
                await self._run_algorithm_here(algorithm, store)
            elif self.role == "runner":
                await self._run_runners(runner, store)
            elif self.main_process == "algorithm":
                await self._run_both(algorithm, runner, store)
            else:
                await self._run_both_runner_main(algorithm, runner, store)
        finally:
            logger.info("client-server run finished")

    # ------------------------------------------------------------------ pieces
    def _supervisor(self, event: ExecutionEvent) -> Supervisor:
        return Supervisor(event, self.graceful_timeout, "graceful_timeout")

    def _on_child_exit(self, supervisor: Supervisor) -> Callable[[Child], None]:
        def on_exit(child: Child) -> None:
            if child.exitcode not in self.allowed_exit_codes:
                supervisor.fail(
                    repr(child),
                    RuntimeError(
                        f"{child.name} (pid {child.pid}) exited with code {child.exitcode}, "
                        f"not one of allowed_exit_codes {self.allowed_exit_codes}"
                    ),
                    traceback=False,
                )

        return on_exit

    def _served(self, store: LightningStore) -> contextlib.AbstractAsyncContextManager[LightningStore]:
        # Binds before anything is spawned: a port in use is an OSError naming it, and nothing runs.
        return _served(store, self.server_host, self.server_port, self.managed_store, self._transport)

    async def _spawn_and_supervise(
        self,
        supervisor: Supervisor,
        specs: Sequence[tuple[str, Callable[..., Awaitable[None]], tuple[Any, ...]]],
        after_bundles: bool = False,
    ) -> None:
        """Spawn the children of ``specs``, then run ``supervisor`` with a watcher per child and the
        four-step escalation as its stop hook. ``after_bundles``: escalate only once the in-process
        bundles are done (the children serve them)."""
        children: list[Child] = []
        lifeline = Lifeline()  # closed after the children: they exit by themselves if we die first
        MultiprocessingHelpers.acquire()
        try:
            with anyio.CancelScope(shield=True):  # a half-spawned set is still stopped below
                try:
                    await anyio.to_thread.run_sync(spawn, specs, children, lifeline)
                except Exception as exc:
                    supervisor.fail("spawning child processes", exc)
                    supervisor.drop_bundles()  # stop the children already started, run nothing
            on_exit = self._on_child_exit(supervisor)
            for child in children:
                supervisor.add_monitor(lambda child=child: child.watch(on_exit))  # type: ignore[misc]

            async def on_stop() -> None:
                if after_bundles:
                    await supervisor.bundles_done.wait()
                await escalate(children, supervisor.event, self.graceful_timeout, self.terminate_timeout)

            supervisor.on_stop = on_stop
            await supervisor.run()
        finally:
            lifeline.close()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(MultiprocessingHelpers.release)

    # ------------------------------------------------------------------ roles
    async def _run_algorithm_here(self, algorithm: AlgorithmBundle, store: LightningStore) -> None:
        async with self._served(store) as served:
            event = ThreadingExecutionEvent()
            supervisor = self._supervisor(event)
            supervisor.add_bundle("algorithm", algorithm, served, event, on_return=event.set)
            await supervisor.run()

    def _runner_store(self, store: LightningStore, endpoint: str) -> LightningStore:
        return self._transport.client(endpoint) if self.managed_store else store

    async def _run_runners(self, runner: RunnerBundle, store: LightningStore) -> None:
        endpoint = self._transport.endpoint(self.server_host, self.server_port)
        if self.n_runners == 1:
            event = ThreadingExecutionEvent()
            supervisor = self._supervisor(event)
            runner_store = self._runner_store(store, endpoint)
            supervisor.add_bundle(
                "runner-0", _runner_child, runner, runner_store, 0, event, self.managed_store
            )
            await supervisor.run()
            return
        self._check_runner_crosses(runner, store)
        process_event = ProcessExecutionEvent()
        try:
            specs = [
                (
                    f"runner-{i}",
                    _runner_child,
                    (runner, self._runner_store(store, endpoint), i, process_event, self.managed_store),
                )
                for i in range(self.n_runners)
            ]
            await self._spawn_and_supervise(self._supervisor(process_event), specs)
        finally:
            process_event.close()

    def _check_runner_crosses(self, runner: RunnerBundle, store: LightningStore) -> None:
        check_picklable("runner bundle", runner, DEFINE_AT_MODULE_LEVEL)
        if not self.managed_store:
            check_picklable(
                "store",
                store,
                "With managed_store=False the store itself is handed to the runner processes and must "
                "pickle; managed_store=True serves it over HTTP instead.",
            )

    async def _run_both(
        self, algorithm: AlgorithmBundle, runner: RunnerBundle, store: LightningStore
    ) -> None:
        self._check_runner_crosses(runner, store)
        event = ProcessExecutionEvent()
        try:
            async with self._served(store) as served:  # stopped once every runner process has exited
                await self._run_both_served(algorithm, runner, store, served, event)
        finally:
            event.close()

    async def _run_both_served(
        self,
        algorithm: AlgorithmBundle,
        runner: RunnerBundle,
        store: LightningStore,
        served: LightningStore,
        event: ProcessExecutionEvent,
    ) -> None:
        server = served if isinstance(served, LightningStoreServer) else None
        runner_store = self._transport.client(server.endpoint) if server is not None else store
        specs = [
            (f"runner-{i}", _runner_child, (runner, runner_store, i, event, self.managed_store))
            for i in range(self.n_runners)
        ]
        supervisor = self._supervisor(event)

        def algorithm_returned() -> None:
            logger.info("algorithm returned: stopping the runners")
            event.set()
            if server is not None:  # idle runners see the event now, not when their long poll ends
                server.end_long_polls()

        supervisor.add_bundle("algorithm", algorithm, served, event, on_return=algorithm_returned)
        await self._spawn_and_supervise(supervisor, specs)

    async def _run_both_runner_main(
        self, algorithm: AlgorithmBundle, runner: RunnerBundle, store: LightningStore
    ) -> None:
        check_picklable("algorithm bundle", algorithm, DEFINE_AT_MODULE_LEVEL)
        check_picklable(
            "store",
            store,
            "With main_process='runner' the algorithm and the store server run in a child process, "
            "which receives the store: it must pickle.",
        )
        port = self.server_port
        if self.managed_store:
            if port == 0:
                port = free_port(self.server_host)
            # Fail fast, naming the port, before the child that will serve on it is started.
            bind_socket(self.server_host, port, listen=False).close()
            self._transport.check_server(self.server_host)  # and the token / certificate rules
        event, ready, release = ProcessExecutionEvent(), ProcessExecutionEvent(), ProcessExecutionEvent()
        try:
            spec = (
                "algorithm",
                _algorithm_child,
                (
                    algorithm,
                    store,
                    self.server_host,
                    port,
                    self.managed_store,
                    event,
                    ready,
                    release,
                    self._transport,
                ),
            )
            supervisor = self._supervisor(event)
            endpoint = self._transport.endpoint(self.server_host, port, bound=True)
            runner_store = self._runner_store(store, endpoint)

            async def runner_here() -> None:
                await _first_of(ready, event)  # the server is up, or the algorithm side has ended
                if ready.is_set() and not event.is_set():
                    await _runner_child(runner, runner_store, 0, event, self.managed_store)

            supervisor.add_bundle("runner-0", runner_here)
            supervisor.on_bundles_done = release.set  # the algorithm child may stop serving now
            await self._spawn_and_supervise(supervisor, [spec], after_bundles=True)
        finally:
            for e in (event, ready, release):
                e.close()

"""``agl-async serve``: one store server process, or several on one address sharing a database.

``serve_one`` serves the store named by a URL until SIGINT/SIGTERM. ``serve_many`` starts
``workers`` such processes on one host:port for a store they can share (PostgreSQL):

* it binds the address itself first, with ``SO_REUSEPORT``, so that "address in use" is reported
  at once and a port of 0 is resolved once for all; its own socket never listens, it only holds
  the address. Each child binds the same address with ``SO_REUSEPORT`` and listens: the kernel
  spreads incoming connections over the children;
* it opens the store once before starting them (so that a wrong URL or an unreachable database
  is one clear error, and the schema is created once);
* each child reports that it listens through a pipe; the parent prints its ready line after all
  have. The children die with the parent (``PR_SET_PDEATHSIG`` where Linux offers it);
* SIGINT/SIGTERM to the parent stop every child (SIGTERM, then SIGKILL after a grace period); a
  child that exits by itself stops the others, and the parent exits 1 naming it.

Every process is a full store server: any of them answers any request, and the database makes
them one store (claims, wake-ups and the watchdog work across processes).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from urllib.parse import urlsplit

import anyio

from .store.base import LightningStore

__all__ = ["SHARED_SCHEMES", "is_shared_store_url", "serve_many", "serve_one", "store_from_url"]

#: Store URL schemes whose stores several processes can share.
SHARED_SCHEMES = ("postgresql", "postgres")
_STOP_GRACE = 15.0


def store_from_url(url: str) -> LightningStore:
    """``memory://`` or ``postgresql://user:password@host:port/dbname``; ``ValueError`` otherwise."""
    scheme = urlsplit(url).scheme if isinstance(url, str) else ""
    if scheme == "memory":
        from .store.memory import InMemoryLightningStore

        return InMemoryLightningStore()
    if scheme in SHARED_SCHEMES:
        from .store.postgres import PostgresLightningStore

        return PostgresLightningStore(url)
    raise ValueError(
        f"unknown store URL {url!r}: expected memory:// or postgresql://user:password@host:port/dbname"
    )


def is_shared_store_url(url: str) -> bool:
    """Whether several processes can serve the store at ``url`` together."""
    return urlsplit(url).scheme in SHARED_SCHEMES


async def serve_one(
    store_url: str,
    host: str,
    port: int,
    token: str | None,
    *,
    reuse_port: bool = False,
    ready_fd: int | None = None,
    quiet: bool = False,
) -> None:
    """Serve the store at ``store_url`` until SIGINT/SIGTERM, then stop the server, close the
    store and return. ``OSError`` when the address cannot be bound; ``ready_fd``: written to
    (one byte) and closed once the server accepts connections."""
    from .http.server import LightningStoreServer

    store = store_from_url(store_url)
    try:
        opener = getattr(store, "open", None)
        if opener is not None:
            await opener()  # a database that cannot be reached is an error now, not at the first request
        server = LightningStoreServer(store, host, port, auth_token=token or "", reuse_port=reuse_port)
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            await server.start()
            try:
                if ready_fd is not None:
                    os.write(ready_fd, b"r")
                    os.close(ready_fd)
                if not quiet:
                    auth = " (bearer token required)" if token else ""
                    print(
                        f"agl-async: store server listening on {server.endpoint}{auth}; Ctrl-C to stop",
                        flush=True,
                    )
                async for signum in signals:
                    if not quiet:
                        name = signal.Signals(signum).name
                        print(f"agl-async: {name} received, stopping the server", flush=True)
                    break
            finally:
                await server.stop()
    finally:
        await store.close()
    if not quiet:
        print("agl-async: server stopped", flush=True)


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGTERM this process when its parent dies; exit at once if it already has."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the parent's SIGTERM on stop still applies
    if os.getppid() != parent_pid:
        os._exit(1)


def _reserve(host: str, port: int) -> socket.socket:
    """Bind (never listen) host:port with SO_REUSEPORT: holds the address for the children."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError("this platform has no SO_REUSEPORT: serve one process per port instead")
    bind_host = "127.0.0.1" if host == "localhost" else host
    family, type_, proto, _, address = socket.getaddrinfo(
        bind_host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


async def _check_store(store_url: str) -> None:
    """Open the store once (connect, create or check its schema) and close it."""
    store = store_from_url(store_url)
    try:
        opener = getattr(store, "open", None)
        if opener is not None:
            await opener()
    finally:
        await store.close()


async def serve_many(
    store_url: str, host: str, port: int, token: str | None, workers: int, *, log_level: str = "WARNING"
) -> int:
    """Run ``workers`` server processes for the shared store at ``store_url`` on one host:port
    (see the module docstring); returns the exit code (0 after a clean stop)."""
    from .store.postgres import _redact

    reservation = _reserve(host, port)
    try:
        port = reservation.getsockname()[1]
        await _check_store(store_url)
        env = dict(os.environ)
        if token:
            env["AGL_SERVER_TOKEN"] = token  # secrets travel in the environment, not on the command
        env["AGL_STORE_URL"] = store_url  # line, where `ps` shows them (a DSN may hold a password)
        read_fd, write_fd = os.pipe()
        processes: list[anyio.abc.Process] = []
        try:
            for _ in range(workers):
                command = [
                    sys.executable,
                    "-m",
                    "agl_async.cli",
                    "--log-level",
                    log_level,
                    "serve",
                    "--host",
                    host,
                    "--port",
                    str(port),
                    "--worker-of",
                    f"{os.getpid()}:{write_fd}",
                ]
                processes.append(
                    await anyio.open_process(command, stdout=None, stderr=None, env=env, pass_fds=(write_fd,))
                )
        finally:
            os.close(write_fd)
        return await _supervise(processes, read_fd, workers, host, port, _redact(store_url))
    finally:
        reservation.close()


async def _supervise(
    processes: list[anyio.abc.Process], read_fd: int, workers: int, host: str, port: int, shown_url: str
) -> int:
    failed: list[str] = []
    stopping = False
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:

            async def watch(process: anyio.abc.Process) -> None:
                code = await process.wait()
                if not stopping:
                    failed.append(f"store server process {process.pid} exited with code {code}")
                    tg.cancel_scope.cancel()

            for process in processes:
                tg.start_soon(watch, process)

            async def ready() -> None:
                got = 0
                while got < workers:
                    chunk = await anyio.to_thread.run_sync(os.read, read_fd, workers, abandon_on_cancel=True)
                    if not chunk:
                        return  # every child closed the pipe: the watchers report who failed
                    got += len(chunk)
                where = f"http://{'127.0.0.1' if host in ('localhost', '0.0.0.0', '') else host}:{port}"
                print(
                    f"agl-async: {workers} store server processes listening on {where} "
                    f"(store {shown_url}); Ctrl-C to stop",
                    flush=True,
                )

            tg.start_soon(ready)
            async for signum in signals:
                print(f"agl-async: {signal.Signals(signum).name} received, stopping the servers", flush=True)
                break
            tg.cancel_scope.cancel()
        stopping = True
        with anyio.CancelScope(shield=True):
            await _stop_all(processes)
    os.close(read_fd)
    if failed:
        print(f"agl-async: error: {failed[0]}; stopped the others", file=sys.stderr, flush=True)
        return 1
    print("agl-async: servers stopped", flush=True)
    return 0


async def _stop_all(processes: list[anyio.abc.Process]) -> None:
    """SIGTERM every child still running, wait up to the grace period, then SIGKILL."""
    for process in processes:
        if process.returncode is None:
            try:
                process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    with anyio.move_on_after(_STOP_GRACE):
        for process in processes:
            await process.wait()
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()

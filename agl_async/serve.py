"""``agl-async serve --workers N``: N store server processes on one address, sharing a database.

:func:`run_workers` (the command's process) serves nothing itself. For a store several processes
can share (PostgreSQL):

* it binds the address first, with ``SO_REUSEPORT`` and without listening, so that "address in
  use" is reported at once and a port of 0 is resolved once for all; its socket only holds the
  address. Each child binds the same address with ``SO_REUSEPORT`` and listens: the kernel
  spreads incoming connections over the children;
* it opens the store once before starting them (a wrong URL or an unreachable database is one
  clear error, and the schema is created once);
* each child (``agl-async serve --worker-of PID:FD``: :func:`become_worker`, then the ordinary
  single-process serve) reports through a pipe once it listens; the parent prints its ready
  line after all have. The children die with the parent (``PR_SET_PDEATHSIG`` on Linux);
* SIGINT/SIGTERM to the parent stop every child (SIGTERM, then SIGKILL after a grace period); the
  children run in sessions of their own, so a Ctrl-C in the terminal reaches the parent only. A
  child that exits by itself stops the others, and the parent exits 1 naming it.

The URL reaches the children in the environment (``AGL_STORE_URL``), not on their command line,
where ``ps`` would show a password. Every child is a full store server: any of them answers any
request, and the database makes them one store (claims, wake-ups and the watchdog work across
processes).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.abc

from ._net import bind_socket, http_url

__all__ = ["SHARED_SCHEMES", "become_worker", "redact_url", "report_ready", "run_workers"]

#: Store URL schemes whose stores several processes can serve together.
SHARED_SCHEMES = ("postgresql", "postgres")
_STOP_GRACE = 15.0


def redact_url(url: str) -> str:
    """``url`` without its password (for what is printed or logged)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))
    except ValueError:
        return "<unparsable URL>"


def run_workers(args: argparse.Namespace, token: str | None, link_token: str | None, error: Any) -> int:
    """The command's process for ``--workers N > 1`` (``token``: the one the command resolved,
    ``link_token``: the one its dashboard link may show); ``error(message, code)`` makes the CLI's
    error (exit code 2 for a store that cannot be shared)."""
    scheme = urlsplit(args.store).scheme.lower()
    if scheme not in SHARED_SCHEMES:
        raise error(
            f"--workers {args.workers} needs a store that several processes can share "
            f"(postgresql://user:password@host:port/dbname); {scheme}:// lives inside one process: "
            "serve it with one worker",
            2,
        )
    options = ["--log-level", args.log_level, "serve", "--host", args.host]
    if args.ssl_certfile:
        options += ["--ssl-certfile", args.ssl_certfile]
        if args.ssl_keyfile:
            options += ["--ssl-keyfile", args.ssl_keyfile]
    if args.insecure:
        options.append("--insecure")
    scheme = "https" if args.ssl_certfile else "http"
    try:
        return anyio.run(
            _serve_many, args.store, args.host, args.port, token, link_token, args.workers, options, scheme
        )
    except ConnectionError as exc:
        raise error(f"cannot open the store {redact_url(args.store)}: {exc}", 1) from None
    except OSError as exc:
        raise error(f"cannot serve on {args.host}:{args.port}: {exc}", 1) from None


def become_worker(worker_of: str) -> int:
    """In a child of :func:`run_workers` (``--worker-of PID:FD``): die with the parent; return the
    file descriptor to report readiness on."""
    parent, _, fd = worker_of.partition(":")
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the parent's SIGTERM at its stop still applies
    if os.getppid() != int(parent):
        os._exit(1)  # the parent is already gone
    return int(fd)


def report_ready(fd: int) -> None:
    """Tell the parent this child accepts connections."""
    os.write(fd, b"r")
    os.close(fd)


async def _check_store(url: str) -> None:
    """Open the store once (connect, create or check its schema) and close it."""
    from .store.urls import open_store

    store = open_store(url)
    try:
        await store.statistics()
    finally:
        await store.close()


async def _serve_many(
    store_url: str,
    host: str,
    port: int,
    token: str | None,
    link_token: str | None,
    workers: int,
    options: list[str],
    scheme: str,
) -> int:
    reservation = bind_socket(host, port, what="the store servers", listen=False, reuse_port=True)
    try:
        port = reservation.getsockname()[1]
        await _check_store(store_url)
        env = {**os.environ, "AGL_STORE_URL": store_url}  # secrets in the environment, not in `ps`
        env.pop("AGL_SERVER_TOKEN", None)
        if token:
            env["AGL_SERVER_TOKEN"] = token
        read_fd, write_fd = os.pipe()
        processes: list[anyio.abc.Process] = []
        try:
            command = [sys.executable, "-m", "agl_async.cli", *options]
            command += ["--port", str(port), "--worker-of", f"{os.getpid()}:{write_fd}"]
            for _ in range(workers):
                # A session of its own: a Ctrl-C in the terminal reaches this process only, which
                # stops the children itself (their exits are then expected, not failures).
                process = await anyio.open_process(
                    command, stdout=None, stderr=None, env=env, pass_fds=(write_fd,), start_new_session=True
                )
                processes.append(process)
        finally:
            os.close(write_fd)
        try:
            endpoint = http_url(host, port, bound=True).replace("http://", f"{scheme}://", 1)
            return await _supervise(processes, read_fd, workers, endpoint, store_url, token, link_token)
        finally:
            os.close(read_fd)
    finally:
        reservation.close()


async def _supervise(
    processes: list[anyio.abc.Process],
    read_fd: int,
    workers: int,
    endpoint: str,
    store_url: str,
    token: str | None,
    link_token: str | None,
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
                        return  # every child closed the pipe: the watchers say who failed
                    got += len(chunk)
                from .http.dashboard import dashboard_url

                auth = " (bearer token required)" if token else ""
                print(
                    f"agl-async: {workers} store server processes listening on {endpoint}{auth}, "
                    f"store {redact_url(store_url)}; Ctrl-C to stop",
                    flush=True,
                )
                link = dashboard_url(endpoint, link_token)  # as a single server prints it (issue 14)
                if token and not link_token:
                    link += " (open it with ?token=<the token in --token-file>)"
                print(f"agl-async: dashboard: {link}", flush=True)

            tg.start_soon(ready)
            async for signum in signals:
                print(f"agl-async: {signal.Signals(signum).name} received, stopping the servers", flush=True)
                break
            tg.cancel_scope.cancel()
        stopping = True
        with anyio.CancelScope(shield=True):
            await _stop_all(processes)
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

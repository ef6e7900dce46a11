"""The ``agl-async`` command line: ``demo``, ``serve`` and ``runner``.

Only :mod:`argparse` is imported up front; each command imports what it needs when it runs, so
``agl-async --help`` stays fast.

Exit codes: 0 success (and a Ctrl-C / SIGTERM that stopped ``serve`` cleanly), 1 a runtime error
(unreachable server, a failed run), 2 a usage error (bad arguments, an agent that does not
import), 130 a Ctrl-C that interrupted ``demo`` or ``runner``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .store.base import LightningStore

__all__ = ["main"]

DEFAULT_PORT = 4747


class CLIError(Exception):
    """A failure to report as ``agl-async: error: <message>`` with an exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------- demo
def _cmd_demo(args: argparse.Namespace) -> int:
    from .examples.evolution import print_summary, run_demo

    store = f", store={args.store}" if args.store else ""
    print(
        f"agl-async demo: evolution strategy on a toy linear task; mode={args.mode}, "
        f"runners={args.runners}, concurrency={args.concurrency}, epochs={args.epochs}, "
        f"seed={args.seed}{store}",
        flush=True,
    )
    if args.store:
        from .store.urls import open_store

        try:
            open_store(args.store)  # checks the URL only; the run opens the store itself
        except ValueError as exc:
            raise CLIError(f"--store: {exc}", 2) from None
    try:
        if args.dashboard:
            import anyio

            anyio.run(_demo_with_dashboard, args)
            return 0
        history = run_demo(
            mode=args.mode,
            runners=args.runners,
            epochs=args.epochs,
            seed=args.seed,
            latency=args.latency,
            port=args.port,
            progress=sys.stdout,
            store=args.store,
            concurrency=args.concurrency,
        )
    except ValueError as exc:  # e.g. --store holds a run with other options
        raise CLIError(str(exc)) from None
    print_summary(history, sys.stdout)
    return 0


async def _demo_with_dashboard(args: argparse.Namespace) -> None:
    """The demo on a store whose dashboard is served on 127.0.0.1 during the run (shm: by a server
    started for it; cs: by the run's own store server) and after it, until Ctrl-C / SIGTERM."""
    import signal

    import anyio

    from .examples.evolution import print_summary, run_demo_async
    from .http.dashboard import dashboard_url
    from .http.server import LightningStoreServer
    from .store.urls import open_store

    store = open_store(args.store or "memory://")
    port = args.port if args.port is not None else 0
    token = os.environ.get("AGL_SERVER_TOKEN") or None  # what the run's own server would require
    server: LightningStoreServer | None = None
    try:
        if args.mode == "shm":
            server = LightningStoreServer(store, "127.0.0.1", port, auth_token=token or "")
            await _start(server)
            port = server.port
        elif port == 0:
            from ._net import free_port

            port = free_port()
        print(f"agl-async: dashboard: {dashboard_url(f'http://127.0.0.1:{port}', token)}", flush=True)
        history = await run_demo_async(  # Ctrl-C here interrupts the run, as without --dashboard
            mode=args.mode,
            runners=args.runners,
            epochs=args.epochs,
            seed=args.seed,
            latency=args.latency,
            port=port if args.mode == "cs" else None,
            progress=sys.stdout,
            store=store,
            concurrency=args.concurrency,
        )
        print_summary(history, sys.stdout)
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            if server is None:  # cs: the run's server has stopped; serve its store again
                server = LightningStoreServer(store, "127.0.0.1", port, auth_token=token or "")
                await _start(server)
            print("agl-async: the run is over; the dashboard stays up until Ctrl-C", flush=True)
            async for signum in signals:
                print(f"agl-async: {signal.Signals(signum).name} received, stopping", flush=True)
                break
    finally:
        with anyio.CancelScope(shield=True):
            if server is not None:
                await server.stop()
            await store.close()


async def _start(server: Any) -> None:
    try:
        await server.start()
    except OSError as exc:
        raise CLIError(f"cannot serve the dashboard: {exc}") from None


# ------------------------------------------------------------------------------------------ serve
def _cmd_serve(args: argparse.Namespace) -> int:
    import anyio

    from .store.urls import open_store

    try:
        store = open_store(args.store)  # --store URL (issue 12)
    except ValueError as exc:
        raise CLIError(f"--store: {exc}", 2) from None
    anyio.run(_serve, args.host, args.port, args.token, store, args.store)
    return 0


async def _open(store: LightningStore, url: str) -> None:
    """One call, so that a store that cannot be opened is reported before serving."""
    try:
        await store.statistics()
    except Exception as exc:
        raise CLIError(f"cannot open the store {url}: {exc}") from None


async def _serve(
    host: str, port: int, token: str | None, store: LightningStore, url: str = "memory://"
) -> None:
    """Serve ``store`` until SIGINT/SIGTERM, then stop the server, close the store and return."""
    import anyio

    try:
        await _open(store, url)
        await _serve_store(host, port, token, store, url)
    finally:
        with anyio.CancelScope(shield=True):
            await store.close()


async def _serve_store(host: str, port: int, token: str | None, store: LightningStore, url: str) -> None:
    import signal

    import anyio

    from .http.dashboard import dashboard_url
    from .http.server import LightningStoreServer

    server = LightningStoreServer(store, host, port, auth_token=token or "")
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            await server.start()
        except OSError as exc:
            raise CLIError(f"cannot serve on {host}:{port}: {exc}") from None
        try:
            auth = " (bearer token required)" if token else ""
            print(
                f"agl-async: store server listening on {server.endpoint}{auth}, store {url}; Ctrl-C to stop",
                flush=True,
            )
            # hook (issue 14): the dashboard's link, printed once to stdout, never logged (it holds the token)
            print(f"agl-async: dashboard: {dashboard_url(server.endpoint, token or None)}", flush=True)
            async for signum in signals:
                print(f"agl-async: {signal.Signals(signum).name} received, stopping the server", flush=True)
                break
        finally:
            await server.stop()
    print("agl-async: server stopped", flush=True)


# ----------------------------------------------------------------------------------------- runner
def _parse_server(url: str) -> tuple[str, int]:
    """``http://host:port`` -> ``(host, port)``; ``ValueError`` saying what is wrong."""
    from urllib.parse import urlsplit

    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http":
        raise ValueError(f"--server must be an http:// URL, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"--server has no host: {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"--server has an invalid port: {url!r}") from None
    if parts.path not in ("", "/"):
        raise ValueError(f"--server must be http://host:port without a path, got {url!r}")
    return parts.hostname, port if port is not None else DEFAULT_PORT


def load_agent(spec: str) -> Any:
    """Import ``module:attr`` (``attr`` may be dotted) the way uvicorn loads apps.

    The current directory is put on ``sys.path`` first, so a local ``my_agent.py`` is found.
    Raises :class:`CLIError` (exit code 2) naming what failed.
    """
    import importlib

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"--agent must look like 'module:attr' (e.g. my_agents:solve), got {spec!r}", 2)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise CLIError(f"cannot import agent module {module_name!r}: {exc}", 2) from None
    except Exception as exc:
        raise CLIError(
            f"importing agent module {module_name!r} failed: {type(exc).__name__}: {exc}", 2
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CLIError(f"module {module_name!r} has no attribute {attr!r}", 2) from None
    if not callable(obj):
        raise CLIError(f"agent {spec!r} is not callable as agent(task_input, resources)", 2)
    return obj


async def _check_reachable(endpoint: str, token: str | None, timeout: float) -> None:
    """One ``statistics()`` call: raises :class:`CLIError` when the server cannot be used."""
    import anyio

    from .http.client import LightningStoreClient

    # No retries: an unreachable server is reported at once instead of after the retry backoff.
    client = LightningStoreClient(endpoint, auth_token=token or "", connect_timeout=timeout, retry_delays=())
    try:
        with anyio.fail_after(timeout):
            await client.statistics()
    except TimeoutError:
        raise CLIError(f"store server at {endpoint} did not answer within {timeout:g}s") from None
    except ValueError as exc:
        raise CLIError(f"store server at {endpoint} refused the request: {exc}") from None
    except Exception as exc:
        raise CLIError(f"cannot reach the store server at {endpoint}: {type(exc).__name__}: {exc}") from None
    finally:
        await client.close()


def _cmd_runner(args: argparse.Namespace) -> int:
    try:
        host, port = _parse_server(args.server)
    except ValueError as exc:
        raise CLIError(str(exc), 2) from None
    if args.n < 1:
        raise CLIError(f"-n must be >= 1, got {args.n}", 2)
    agent = load_agent(args.agent)

    import anyio

    endpoint = f"http://{host}:{port}"
    token = args.token or None
    if token:
        # The runner processes' store clients take their token from the environment.
        os.environ["AGL_SERVER_TOKEN"] = token
    anyio.run(_check_reachable, endpoint, token, args.connect_timeout)

    from .execution.client_server import ClientServerExecutionStrategy
    from .trainer import Trainer

    strategy = ClientServerExecutionStrategy(
        role="runner", server_host=host, server_port=port, n_runners=args.n
    )
    trainer = Trainer(strategy=strategy, max_rollouts=args.max_rollouts, concurrency=args.concurrency)
    slots = f" x {args.concurrency} concurrent rollouts" if args.concurrency > 1 else ""
    print(f"agl-async: {args.n} runner(s){slots} of {args.agent} attached to {endpoint}", flush=True)
    try:
        trainer.fit(agent)
    except (RuntimeError, OSError) as exc:
        raise CLIError(f"runners stopped: {exc}") from None
    print("agl-async: runners finished", flush=True)
    return 0


# ------------------------------------------------------------------------------------------ parser
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agl-async",
        description="agl-async: an asyncio-native execution framework for training agents with RL.",
        epilog="Run 'agl-async COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level of the agl_async loggers on stderr (default WARNING)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run the example training loop (evolution strategy on a toy task)",
        description=(
            "Train a linear policy with an evolution strategy on a seeded toy task and print a live "
            "progress line and a summary table; the mean reward rises epoch by epoch. The defaults "
            "need nothing: in-memory store, shared-memory mode, no ports."
        ),
    )
    demo.add_argument(
        "--mode",
        choices=["shm", "cs"],
        default="shm",
        help="shm: all in this process (default); cs: store over HTTP on 127.0.0.1, runner processes",
    )
    demo.add_argument("--runners", type=_positive_int, default=4, metavar="N", help="runners (default 4)")
    demo.add_argument(
        "--concurrency",
        type=_positive_int,
        default=1,
        metavar="C",
        help="rollouts each runner works on at once (default 1)",
    )
    demo.add_argument("--epochs", type=_positive_int, default=12, metavar="E", help="epochs (default 12)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the tasks and the search (default 0)")
    demo.add_argument(
        "--latency",
        type=float,
        default=0.005,
        metavar="SEC",
        help="simulated work per rollout in seconds (default 0.005)",
    )
    demo.add_argument(
        "--port", type=int, default=None, help="store server / dashboard port (default: a free one)"
    )
    demo.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help=(
            "the store (default: in memory). With a database, e.g. sqlite:///demo.db, the run is "
            "resumable: interrupt it, run the same command again, and it continues where it stopped"
        ),
    )
    demo.add_argument(
        "--dashboard",
        action="store_true",
        help=(
            "serve the live dashboard of the run on 127.0.0.1 and print its URL; it stays up after "
            "the run until Ctrl-C (use --latency 0.2 to watch a slower run)"
        ),
    )
    demo.set_defaults(handler=_cmd_demo)

    serve = commands.add_parser(
        "serve",
        help="run a standalone store server for runners on other machines",
        description=(
            "Serve a LightningStore over HTTP until Ctrl-C (SIGINT) or SIGTERM, which stop it cleanly "
            "(exit code 0). Point algorithms and 'agl-async runner' at it. The store is a fresh "
            "in-memory one unless --store names a database, which outlives the server."
        ),
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 = all)"
    )
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    serve.add_argument(
        "--token",
        default=os.environ.get("AGL_SERVER_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' on every request (default: env AGL_SERVER_TOKEN)",
    )
    serve.add_argument(
        "--store",
        default="memory://",
        metavar="URL",
        help=(
            "the store to serve: memory:// (default), sqlite:///relative/path.db, "
            "sqlite:////absolute/path.db or postgresql://user:password@host:port/dbname"
        ),
    )
    serve.set_defaults(handler=_cmd_serve)

    runner = commands.add_parser(
        "runner",
        help="attach runner processes to a store server",
        description=(
            "Attach N runners to the store server at --server: each dequeues rollouts, calls the "
            "agent(task_input, resources) and records its reward, up to C rollouts at once "
            "(--concurrency). N > 1 starts N worker processes. "
            "Runs until every runner has done --max-rollouts rollouts, or until Ctrl-C."
        ),
    )
    runner.add_argument("--server", required=True, metavar="URL", help="store server, http://host:port")
    runner.add_argument(
        "--agent",
        required=True,
        metavar="MODULE:ATTR",
        help="the agent to run, e.g. my_agents:solve (the current directory is importable)",
    )
    runner.add_argument(
        "-n", "--n-runners", dest="n", type=int, default=1, metavar="N", help="runners (default 1)"
    )
    runner.add_argument(
        "--concurrency",
        type=_positive_int,
        default=1,
        metavar="C",
        help="rollouts each runner works on at once (default 1): N x C in flight; "
        "I/O-bound agents: raise C; CPU-bound agents: raise N",
    )
    runner.add_argument(
        "--max-rollouts",
        type=_positive_int,
        default=None,
        metavar="M",
        help="stop each runner after M rollouts (all its concurrent ones together)",
    )
    runner.add_argument(
        "--token", default=os.environ.get("AGL_SERVER_TOKEN"), help="bearer token of the server"
    )
    runner.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="SEC",
        help="give up if the server does not answer within SEC seconds (default 10)",
    )
    runner.set_defaults(handler=_cmd_runner)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``agl-async``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(f"agl-async {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package_logger = logging.getLogger("agl_async")  # ours only: httpx/uvicorn stay quiet
    package_logger.addHandler(handler)
    package_logger.setLevel(args.log_level)
    try:
        code: int = args.handler(args)
    except CLIError as exc:
        print(f"agl-async: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("agl-async: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())

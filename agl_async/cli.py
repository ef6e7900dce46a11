"""The ``agl-async`` command line: ``demo``, ``serve`` and ``runner``.

Only :mod:`argparse` is imported up front; each command imports what it needs when it runs, so
``agl-async --help`` stays fast.

Exit codes: 0 success (and a Ctrl-C / SIGTERM that stopped ``serve`` cleanly; and runners that
the store server told the run is over), 1 a runtime error (unreachable server, a failed run), 2 a
usage error (bad arguments, an agent that does not import, an unreadable token file, a
non-loopback ``serve`` without a token), 130 a Ctrl-C and 143 a SIGTERM that interrupted ``demo``
or ``runner`` (after the same clean shutdown).

Every value is checked when the command line is parsed: a bad one is one ``error:`` line and exit
code 2, never a traceback, a hang or a silent default.

Tokens: ``--token-file PATH`` (the file's content, surrounding whitespace and the trailing newline
stripped), else ``--token``, else env ``AGL_SERVER_TOKEN``. A token on the command line is
visible to every user of the host in the process list: prefer the file or the variable. No
command prints or logs a token.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from collections.abc import Callable, Sequence
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
    if args.port is not None and args.mode != "cs" and not (args.dashboard or args.traced):
        raise CLIError("--port applies to --mode cs or --dashboard only (nothing else serves)", 2)
    if args.traced:
        return _traced_demo(args)
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


def _traced_demo(args: argparse.Namespace) -> int:
    if args.store or args.dashboard:
        raise CLIError("--traced runs on its own store in memory: drop --store / --dashboard", 2)
    print(
        f"agl-async demo --traced: a traced agent against a local OpenAI-compatible mock; mode={args.mode}, "
        f"runners={args.runners}, seed={args.seed}",
        flush=True,
    )
    try:
        from .examples.traced import run_traced_demo
    except ImportError as exc:  # opentelemetry-api itself is missing
        raise CLIError(
            f'--traced needs the OpenTelemetry SDK: pip install "agl-async[otel]" ({exc})', 2
        ) from None
    try:
        run_traced_demo(
            mode=args.mode, runners=args.runners, seed=args.seed, port=args.port, progress=sys.stdout
        )
    except RuntimeError as exc:
        raise CLIError(str(exc), 2) from None
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
def read_token(args: argparse.Namespace) -> str | None:
    """The bearer token of ``serve`` / ``runner``: ``--token-file``, else ``--token``, else env
    ``AGL_SERVER_TOKEN``; ``None`` when there is none. :class:`CLIError` (exit code 2) for a token
    file that cannot be read, is empty, or holds a token spanning lines."""
    path = getattr(args, "token_file", None)
    if path is None:
        token = args.token if args.token is not None else os.environ.get("AGL_SERVER_TOKEN")
        return token or None
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
        mode = os.stat(path).st_mode
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CLIError(f"cannot read --token-file {path!r}: {reason}", 2) from None
    if not token:
        raise CLIError(f"--token-file {path!r} is empty", 2)
    if any(c in token for c in "\r\n\0"):
        raise CLIError(f"--token-file {path!r} must hold one line (the token)", 2)
    if mode & 0o077:
        print(
            f"agl-async: warning: --token-file {path!r} is accessible to other users "
            f"(mode {mode & 0o777:o}); 'chmod 600' it",
            file=sys.stderr,
            flush=True,
        )
    return token


def _cmd_serve(args: argparse.Namespace) -> int:
    import anyio

    if args.ssl_keyfile and not args.ssl_certfile:
        raise CLIError("--ssl-keyfile needs --ssl-certfile (the certificate it belongs to)", 2)
    token = read_token(args)
    from .http._security import UnauthenticatedBindError
    from .http.server import LightningStoreServer
    from .store.urls import open_store

    try:
        store = open_store(args.store)  # --store URL (issue 12); connects on first use
    except ValueError as exc:
        raise CLIError(f"--store: {exc}", 2) from None
    tls: dict[str, Any] = {}
    if args.ssl_certfile:
        tls = {"ssl_certfile": args.ssl_certfile, "ssl_keyfile": args.ssl_keyfile}
    if args.insecure:
        tls["allow_unauthenticated"] = True
    worker_of = args.worker_of  # [issue 12] one of `serve --workers N`'s processes (agl_async/serve.py)
    try:
        server = LightningStoreServer(
            store, args.host, args.port, auth_token=token or "", reuse_port=worker_of is not None, **tls
        )
    except UnauthenticatedBindError as exc:
        raise CLIError(
            f"refusing to serve the store on {exc.host!r} (not a loopback address) without a token: "
            "anyone who can reach it could read and change the store. Pass --token-file PATH (or set "
            "AGL_SERVER_TOKEN), or --insecure to serve without one anyway",
            2,
        ) from None
    except ValueError as exc:  # an unusable certificate, ...
        raise CLIError(str(exc), 2) from None
    # The dashboard link carries the token, except one read from a file: that user keeps it off
    # terminals and logs.
    link_token = None if args.token_file else token
    ready_fd = None
    if args.workers > 1 or worker_of:  # [issue 12] N processes on one address: agl_async/serve.py
        from . import serve

        if worker_of is None:
            return serve.run_workers(args, token, link_token, CLIError)
        ready_fd = serve.become_worker(worker_of)
    anyio.run(_serve, server, token, link_token, store, args.store, ready_fd)
    return 0


async def _open(store: LightningStore, url: str) -> None:
    """One call, so that a store that cannot be opened is reported before serving."""
    try:
        await store.statistics()
    except Exception as exc:
        raise CLIError(f"cannot open the store {url}: {exc}") from None


async def _serve(
    server: Any,
    token: str | None,
    link_token: str | None,
    store: LightningStore,
    url: str = "memory://",
    ready_fd: int | None = None,
) -> None:
    """Serve ``store`` until SIGINT/SIGTERM, then stop the server, close the store and return.
    ``ready_fd``: one of ``serve --workers``'s processes, which reports there (agl_async/serve.py)."""
    import anyio

    try:
        await _open(store, url)
        await _serve_store(server, token, link_token, url, ready_fd)
    finally:
        with anyio.CancelScope(shield=True):
            await store.close()


async def _serve_store(
    server: Any, token: str | None, link_token: str | None, url: str, ready_fd: int | None = None
) -> None:
    import signal

    import anyio

    from .http.dashboard import dashboard_url
    from .serve import redact_url, report_ready

    url = redact_url(url)  # [issue 12] a DSN's password stays out of the output

    host, port = server.host, server.port
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            await server.start()
        except OSError as exc:
            raise CLIError(f"cannot serve on {host}:{port}: {exc}") from None
        try:
            auth = " (bearer token required)" if token else ""
            if ready_fd is not None:
                report_ready(ready_fd)  # [issue 12] the parent reports for all its processes
            else:
                where = f"{server.endpoint}{auth}, store {url}"
                print(f"agl-async: store server listening on {where}; Ctrl-C to stop", flush=True)
                # hook (issue 14): the dashboard's link, printed once to stdout, never logged
                # (it holds the token)
                link = dashboard_url(server.endpoint, link_token)
                if token and not link_token:
                    link += " (open it with ?token=<the token in --token-file>)"
                print(f"agl-async: dashboard: {link}", flush=True)
            async for signum in signals:
                if ready_fd is None:
                    print(
                        f"agl-async: {signal.Signals(signum).name} received, stopping the server", flush=True
                    )
                break
        finally:
            server.end_run()  # attached runners hear that the run is over and exit 0
            await server.stop()
    if ready_fd is None:
        print("agl-async: server stopped", flush=True)


# ----------------------------------------------------------------------------------------- runner
def _parse_server(url: str) -> tuple[str, str, int]:
    """``http(s)://host:port`` -> ``(scheme, host, port)``; ``ValueError`` saying what is wrong."""
    from urllib.parse import urlsplit

    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"--server must be an http:// or https:// URL, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"--server has no host: {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"--server has an invalid port: {url!r}") from None
    if parts.path not in ("", "/"):
        raise ValueError(f"--server must be {parts.scheme}://host:port without a path, got {url!r}")
    return parts.scheme, parts.hostname, port if port is not None else DEFAULT_PORT


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


async def _check_reachable(endpoint: str, token: str | None, timeout: float, verify: Any = True) -> None:
    """One ``statistics()`` call: raises :class:`CLIError` when the server cannot be used."""
    import anyio

    from .http.client import LightningStoreClient

    # No retries: an unreachable server is reported at once instead of after the retry backoff.
    client = LightningStoreClient(
        endpoint, auth_token=token or "", verify=verify, connect_timeout=timeout, retry_delays=()
    )
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
        scheme, host, port = _parse_server(args.server)
    except ValueError as exc:
        raise CLIError(str(exc), 2) from None
    verify: bool | str = True
    if args.ca_file is not None:
        if scheme != "https":
            raise CLIError(f"--ca-file verifies an https:// server, but --server is {args.server!r}", 2)
        if not os.path.isfile(args.ca_file):
            raise CLIError(f"--ca-file {args.ca_file!r} does not exist", 2)
        verify = args.ca_file
    token = read_token(args)
    agent = load_agent(args.agent)
    if args.ray is not None:  # hook (issue 15): a usage error before anything is contacted
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise CLIError("--ray needs Ray: install the extra with pip install 'agl-async[ray]'", 2)

    import anyio

    display_host = f"[{host}]" if ":" in host else host
    endpoint = f"{scheme}://{display_host}:{port}"
    anyio.run(_check_reachable, endpoint, token, args.connect_timeout, verify)
    if args.ray is not None:  # hook (issue 15): runner actors on a Ray cluster
        return _run_ray_runners(args, agent, endpoint, token)

    from .execution.client_server import ClientServerExecutionStrategy
    from .trainer import Trainer

    # The token and the CA path reach the runner processes inside their pickled store clients.
    strategy = ClientServerExecutionStrategy(
        role="runner",
        server_host=host,
        server_port=port,
        n_runners=args.n,
        auth_token=token or "",
        verify=verify,
        tls=scheme == "https",
    )
    trainer = Trainer(strategy=strategy, max_rollouts=args.max_rollouts, concurrency=args.concurrency)
    slots = f" x {args.concurrency} concurrent rollouts" if args.concurrency > 1 else ""
    print(f"agl-async: {args.n} runner(s){slots} of {args.agent} attached to {endpoint}", flush=True)
    try:
        trainer.fit(agent)
    except (RuntimeError, OSError, ConnectionError) as exc:
        raise CLIError(f"runners stopped: {exc}") from None
    print("agl-async: runners finished", flush=True)
    return 0


def _run_ray_runners(args: argparse.Namespace, agent: Any, endpoint: str, token: str | None) -> int:
    """``runner --ray N``: N runner actors on the Ray cluster (see agl_async.execution.ray)."""
    import anyio

    try:
        from .execution.ray import run_runner_actors
    except ImportError as exc:
        raise CLIError(str(exc), 2) from None
    from .execution._signals import cancel_on_signals
    from .trainer import Trainer

    # The runner bundle exactly as `runner -n` would run it (--concurrency is passed on once the
    # command has it); the token and the CA path travel to the actors' store clients.
    trainer_options: dict[str, Any] = {"max_rollouts": args.max_rollouts}
    if getattr(args, "concurrency", None) is not None:
        trainer_options["concurrency"] = args.concurrency
    _, runner = Trainer(**trainer_options)._bundles(agent, None, None)
    options: dict[str, Any] = {}
    if args.ray_num_cpus is not None:
        options["num_cpus"] = args.ray_num_cpus
    print(f"agl-async: placing {args.ray} runner actor(s) of {args.agent} against {endpoint}", flush=True)

    async def main() -> object:
        return await cancel_on_signals(
            functools.partial(
                run_runner_actors,
                runner,
                endpoint,
                args.ray,
                auth_token=token,
                address=args.ray_address,
                runner_options=options,
                max_restarts=args.max_restarts,
                verify=args.ca_file if args.ca_file is not None else True,
            )
        )

    try:
        interrupted = anyio.run(main) is not None
    except (RuntimeError, OSError, ConnectionError) as exc:
        raise CLIError(f"runner actors stopped: {exc}") from None
    if interrupted:
        raise KeyboardInterrupt
    print("agl-async: runner actors finished", flush=True)
    return 0


# ------------------------------------------------------------------------------------------ parser
#: Upper bound of ``demo --runners`` and ``runner -n``: each client-server runner is a process.
MAX_RUNNERS = 256
#: Upper bound of ``demo --latency`` (seconds of simulated work per rollout).
MAX_LATENCY = 60.0


def _int(text: str) -> int:
    """A plain decimal integer (no ``_`` separators, no ``+``: what a person types)."""
    stripped = text.strip()
    digits = stripped[1:] if stripped.startswith("-") else stripped
    if not digits.isdigit() or not digits.isascii():
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}")
    return int(stripped)


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _runners(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_RUNNERS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_RUNNERS}, got {value}")
    return value


def _port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 0..65535, got {value}")
    return value


def _seconds(*, positive: bool, maximum: float = math.inf) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
        low_ok = value > 0 if positive else value >= 0
        if not math.isfinite(value) or not low_ok or value > maximum:
            bound = "> 0" if positive else ">= 0"
            top = f" and <= {maximum:g}" if math.isfinite(maximum) else ""
            raise argparse.ArgumentTypeError(f"must be a finite number of seconds {bound}{top}, got {text!r}")
        return value

    return parse


def _token_options(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--token-file",
        metavar="PATH",
        help=f"{what}, read from PATH (recommended: not visible in the process list)",
    )
    group.add_argument(
        "--token",
        help=f"{what} (visible to other users in the process list: prefer --token-file or env "
        "AGL_SERVER_TOKEN, the default)",
    )


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
    demo.add_argument(
        "--runners", type=_runners, default=4, metavar="N", help=f"runners, 1..{MAX_RUNNERS} (default 4)"
    )
    demo.add_argument(
        "--concurrency",
        type=_positive_int,
        default=1,
        metavar="C",
        help="rollouts each runner works on at once (default 1)",
    )
    demo.add_argument("--epochs", type=_positive_int, default=12, metavar="E", help="epochs (default 12)")
    demo.add_argument("--seed", type=_int, default=0, help="seed of the tasks and the search (default 0)")
    demo.add_argument(
        "--latency",
        type=_seconds(positive=False, maximum=MAX_LATENCY),
        default=0.005,
        metavar="SEC",
        help=f"simulated work per rollout in seconds, 0..{MAX_LATENCY:g} (default 0.005)",
    )
    demo.add_argument(
        "--port",
        type=_port,
        default=None,
        help="--mode cs / --dashboard: store server / dashboard port (default: a free one)",
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
    demo.add_argument(
        "--traced",
        action="store_true",
        help="instead: a traced agent calling a local OpenAI-compatible mock; shows the spans that reach "
        "the store (needs the otel extra)",
    )
    demo.set_defaults(handler=_cmd_demo)

    serve = commands.add_parser(
        "serve",
        help="run a standalone store server for runners on other machines",
        description=(
            "Serve a LightningStore over HTTP until Ctrl-C (SIGINT) or SIGTERM, which stop it cleanly "
            "(exit code 0). Point algorithms and 'agl-async runner' at it. The store is a fresh "
            "in-memory one unless --store names a database, which outlives the server. With a "
            "PostgreSQL store, --workers N runs N server processes on one address sharing the database."
        ),
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 = all)"
    )
    serve.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    _token_options(serve, "require 'Authorization: Bearer TOKEN' on every request")
    serve.add_argument(
        "--ssl-certfile",
        metavar="PEM",
        help="serve HTTPS with this certificate chain (PEM; may also hold the key)",
    )
    serve.add_argument("--ssl-keyfile", metavar="PEM", help="the certificate's private key (PEM)")
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="allow binding a non-loopback --host without a token (anyone who reaches it can use the store)",
    )
    serve.add_argument(
        "--store",
        default=os.environ.get("AGL_STORE_URL") or "memory://",  # [issue 12]
        metavar="URL",
        help=(
            "the store to serve: memory:// (default), sqlite:///relative/path.db, "
            "sqlite:////absolute/path.db or postgresql://user:password@host:port/dbname "
            "(default: env AGL_STORE_URL, else memory://)"
        ),
    )
    serve.add_argument(  # [issue 12]
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="server processes on the one address, sharing the store (PostgreSQL only; default 1)",
    )
    serve.add_argument("--worker-of", default=None, help=argparse.SUPPRESS)  # [issue 12] PARENT_PID:READY_FD
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
    runner.add_argument(
        "--server", required=True, metavar="URL", help="store server, http://host:port or https://host:port"
    )
    runner.add_argument(
        "--agent",
        required=True,
        metavar="MODULE:ATTR",
        help="the agent to run, e.g. my_agents:solve (the current directory is importable)",
    )
    runner.add_argument(
        "-n",
        "--n-runners",
        dest="n",
        type=_runners,
        default=1,
        metavar="N",
        help=f"runners, 1..{MAX_RUNNERS} (default 1; more than one: one process each)",
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
    _token_options(runner, "bearer token of the server")
    runner.add_argument(
        "--ca-file",
        metavar="PEM",
        help="CA bundle that signed the https:// server's certificate (default: the system's trust store)",
    )
    runner.add_argument(
        "--connect-timeout",
        type=_seconds(positive=True),
        default=10.0,
        metavar="SEC",
        help="give up if the server does not answer within SEC seconds (default 10)",
    )
    ray = runner.add_argument_group("Ray (needs agl-async[ray])")
    ray.add_argument(
        "--ray",
        type=_positive_int,
        default=None,
        metavar="N",
        help="place N runner actors on a Ray cluster instead of local processes (the cluster at "
        "--ray-address, else RAY_ADDRESS or the last `ray start` here, else a new local one); "
        "--server must be reachable from its nodes",
    )
    ray.add_argument("--ray-address", default=None, metavar="ADDR", help="Ray cluster address")
    ray.add_argument(
        "--ray-num-cpus", type=float, default=None, metavar="C", help="CPUs reserved per runner actor"
    )
    ray.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="R",
        help="restart a runner actor whose process dies up to R times (-1: always; default 0)",
    )
    runner.set_defaults(handler=_cmd_runner)
    return parser


def _ignore_stop_signals() -> None:
    """The command is about to exit: a further SIGINT or SIGTERM must not turn its clean exit into
    a traceback or a death by signal."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


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

    from .execution._signals import EXIT_CODE_SIGTERM, Terminated

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
        _ignore_stop_signals()  # exiting: a further Ctrl-C must not print a traceback now
        print("agl-async: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        _ignore_stop_signals()
        print("agl-async: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_CODE_SIGTERM
    return code


if __name__ == "__main__":
    sys.exit(main())

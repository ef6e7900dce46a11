"""``ExecutionStrategy``: how the algorithm bundle and the runner bundles of one run are executed.

A strategy's ``await execute(algorithm, runner, store)`` runs one whole run inside the caller's
event loop; ``run(...)`` is the blocking convenience that starts a loop with ``anyio.run`` and
turns Ctrl-C into the same shutdown as cancelling ``execute``, then raises ``KeyboardInterrupt``.

Strategies are also resolvable by alias (``"shm"``, ``"cs"``), by class, or from a dict
``{"type": "shm", **kwargs}`` through :func:`resolve_strategy`, which is what the trainer uses.
The ``env_*`` helpers resolve constructor arguments from ``AGL_*`` environment variables and raise
``ValueError`` naming the variable on a bad value.
"""

from __future__ import annotations

import abc
import importlib
import inspect
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import anyio
from anyio.abc import TaskStatus

from ..store.base import LightningStore
from .events import ExecutionEvent

__all__ = [
    "AlgorithmBundle",
    "ExecutionEvent",
    "ExecutionStrategy",
    "RunnerBundle",
    "cancel_on_sigint",
    "env_bool",
    "env_choice",
    "env_int",
    "env_str",
    "register_strategy",
    "resolve_strategy",
]

logger = logging.getLogger("agl_async.execution")


class AlgorithmBundle(Protocol):
    """``async def algorithm(store, event)``: the training side of a run."""

    async def __call__(self, store: LightningStore, event: ExecutionEvent) -> None: ...


class RunnerBundle(Protocol):
    """``async def runner(store, worker_id, event)``: one rollout worker (``worker_id`` 0 … n-1)."""

    async def __call__(self, store: LightningStore, worker_id: int, event: ExecutionEvent) -> None: ...


class ExecutionStrategy(abc.ABC):
    """Runs an algorithm bundle and runner bundles against one store.

    Subclasses set ``alias`` (the short name accepted by :func:`resolve_strategy`) and implement
    :meth:`execute`.
    """

    alias: str = ""

    @abc.abstractmethod
    async def execute(self, algorithm: AlgorithmBundle, runner: RunnerBundle, store: LightningStore) -> None:
        """Run one whole run inside the running event loop and return when every bundle is done.

        Never starts an event loop itself. The first error of a bundle is re-raised as itself;
        cancelling the call shuts the run down (event, grace, cancel) before the cancellation
        propagates.
        """

    def run(
        self,
        algorithm: AlgorithmBundle,
        runner: RunnerBundle,
        store: LightningStore,
        *,
        backend: str = "asyncio",
    ) -> None:
        """Blocking form of :meth:`execute` for code without an event loop.

        Ctrl-C (SIGINT, when called from the main thread) cancels ``execute`` — i.e. the same
        cooperative shutdown as a cancellation by the caller — and, once it has finished,
        raises ``KeyboardInterrupt``. Further Ctrl-Cs during that shutdown are logged and ignored:
        the shutdown is bounded by the strategy's own timeouts.
        """
        anyio.run(self._run_main, algorithm, runner, store, backend=backend)

    async def _run_main(
        self, algorithm: AlgorithmBundle, runner: RunnerBundle, store: LightningStore
    ) -> None:
        if await cancel_on_sigint(self.execute, algorithm, runner, store):
            raise KeyboardInterrupt


async def cancel_on_sigint(fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
    """Await ``fn(*args)``; a SIGINT cancels it instead of raising ``KeyboardInterrupt`` mid-flight.

    Returns ``True`` when a SIGINT arrived (``fn`` was cancelled, or finished meanwhile), ``False``
    when ``fn`` finished without one; ``fn``'s own exception propagates as itself. Further SIGINTs
    while ``fn`` winds down are logged and ignored. Off the main thread (where no signal arrives)
    this is just ``await fn(*args)``.
    """
    if threading.current_thread() is not threading.main_thread():
        await fn(*args)
        return False
    interrupted = False
    outcome: list[BaseException] = []
    fn_scope = anyio.CancelScope()
    watcher_scope = anyio.CancelScope()

    async def watcher(*, task_status: TaskStatus[None]) -> None:
        nonlocal interrupted
        with watcher_scope, anyio.open_signal_receiver(signal.SIGINT) as signals:
            task_status.started()
            async for _ in signals:
                if interrupted:
                    logger.warning("SIGINT again: the shutdown in progress is bounded by its timeouts")
                    continue
                interrupted = True
                logger.warning("SIGINT: cancelling and shutting down")
                fn_scope.cancel()

    async def runner() -> None:
        try:
            with fn_scope:
                await fn(*args)
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:  # anything but the cancellation absorbed by fn_scope
            outcome.append(exc)
        finally:
            watcher_scope.cancel()

    async with anyio.create_task_group() as tg:
        await tg.start(watcher)  # SIGINT is ours before fn starts
        tg.start_soon(runner)
    if outcome:
        raise outcome[0]
    return interrupted


_BUILTIN: dict[str, str] = {
    "shm": "agl_async.execution.shared_memory:SharedMemoryExecutionStrategy",
    "shared_memory": "agl_async.execution.shared_memory:SharedMemoryExecutionStrategy",
    "cs": "agl_async.execution.client_server:ClientServerExecutionStrategy",
    "client_server": "agl_async.execution.client_server:ClientServerExecutionStrategy",
    "ray": "agl_async.execution.ray:RayExecutionStrategy",  # hook (issue 15): needs the ray extra
}
_REGISTRY: dict[str, type[ExecutionStrategy]] = {}

S = TypeVar("S", bound=type[ExecutionStrategy])


def register_strategy(cls: S, *aliases: str) -> S:
    """Make ``cls`` resolvable by its ``alias`` and by ``aliases``."""
    for name in (cls.alias, *aliases):
        if name:
            _REGISTRY[name] = cls
    return cls


def _strategy_class(name: str) -> type[ExecutionStrategy]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    target = _BUILTIN.get(name)
    if target is None and (":" in name or "." in name):
        target = name if ":" in name else "{}:{}".format(*name.rsplit(".", 1))
    if target is None:
        known = sorted({*_BUILTIN, *_REGISTRY})
        raise ValueError(f"unknown execution strategy {name!r}; known aliases: {', '.join(known)}")
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import execution strategy {name!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, ExecutionStrategy)):
        raise ValueError(f"{name!r} is not an ExecutionStrategy subclass")
    return cls


def resolve_strategy(
    spec: ExecutionStrategy | type[ExecutionStrategy] | str | Mapping[str, Any] | None,
    *,
    default: str = "shm",
    **defaults: Any,
) -> ExecutionStrategy:
    """Build a strategy from an instance (returned as is), a class, an alias / ``"module:Class"``
    path, a dict ``{"type": alias, **kwargs}``, or ``None`` (``default``).

    ``defaults`` (e.g. ``n_runners=4``) fill constructor parameters that the spec does not set
    and that the class accepts. Raises ``ValueError`` for an unknown alias or a dict without
    ``"type"``, and ``TypeError`` for anything else.
    """
    if isinstance(spec, ExecutionStrategy):
        return spec
    kwargs: dict[str, Any] = {}
    if spec is None:
        cls = _strategy_class(default)
    elif isinstance(spec, str):
        cls = _strategy_class(spec)
    elif isinstance(spec, type) and issubclass(spec, ExecutionStrategy):
        cls = spec
    elif isinstance(spec, Mapping):
        if "type" not in spec:
            raise ValueError(
                f'a strategy dict needs a "type" key (e.g. {{"type": "shm"}}), got {dict(spec)!r}'
            )
        kwargs = {k: v for k, v in spec.items() if k != "type"}
        kind = spec["type"]
        if isinstance(kind, type) and issubclass(kind, ExecutionStrategy):
            cls = kind
        elif isinstance(kind, str):
            cls = _strategy_class(kind)
        else:
            raise ValueError(f'strategy "type" must be an alias or an ExecutionStrategy class, got {kind!r}')
    else:
        raise TypeError(
            f"strategy must be an ExecutionStrategy, an alias such as 'shm' / 'cs', or a dict "
            f'{{"type": ...}}, got {type(spec).__name__}'
        )
    params = inspect.signature(cls.__init__).parameters
    for key, value in defaults.items():
        if key not in kwargs and key in params and value is not None:
            kwargs[key] = value
    return cls(**kwargs)


# ---------------------------------------------------------------------------- environment helpers
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _env(name: str) -> str | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    return raw.strip()


def env_str(name: str, override: str | None, default: str) -> str:
    """``override`` if given, else env ``name`` if set and non-empty, else ``default``."""
    if override is not None:
        return override
    raw = _env(name)
    return default if raw is None else raw


def env_choice(name: str, param: str, override: str | None, default: str, choices: tuple[str, ...]) -> str:
    """Like :func:`env_str`, restricted to ``choices``; a bad value names ``param`` or ``name``."""
    value = env_str(name, override, default)
    if value not in choices:
        source = param if override is not None else f"environment variable {name}"
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{source} must be one of {allowed}, got {value!r}")
    return value


def env_int(name: str, param: str, override: int | None, default: int) -> int:
    """``override`` / env ``name`` parsed as an integer / ``default``."""
    if override is not None:
        if isinstance(override, bool) or not isinstance(override, int):
            raise ValueError(f"{param} must be an integer, got {override!r}")
        return override
    raw = _env(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def env_bool(name: str, param: str, override: bool | None, default: bool) -> bool:
    """``override`` / env ``name`` parsed as a boolean (1/0, true/false, yes/no, on/off)."""
    if override is not None:
        if not isinstance(override, bool):
            raise ValueError(f"{param} must be a boolean, got {override!r}")
        return override
    raw = _env(name)
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(
        f"environment variable {name} must be a boolean (1/0, true/false, yes/no, on/off), got {raw!r}"
    )

"""``Supervisor``: run the in-process bundles of one run and shut them down on the stop event.

Shared by both strategies. Semantics, all implemented with anyio cancel scopes:

* Every bundle is a task of one task group, inside a *grace scope*. A bundle that raises records
  the first error (later ones are only logged) and sets the event; it never cancels its siblings
  directly.
* Whoever sets the event (a bundle returning, a bundle failing, another thread or process, the
  caller cancelling), one stopper task sees it, puts a deadline of ``grace`` seconds on the grace
  scope — bundles still running then are cancelled — and runs the strategy's ``on_stop`` hook
  (the process escalation of the client-server strategy).
* Monitors (child-process watchers) run beside the bundles but outside the grace scope: they end
  when what they watch ends.
* The caller cancelling ``run()`` (an anyio cancel scope or a native ``Task.cancel()``) does not
  reach the bundles: the supervised work runs in a shielded task, and a watcher task that *is*
  exposed to the caller's cancellation sets the event instead. Once everything has ended the
  cancellation propagates. It takes precedence over a recorded error (which was logged).
* When nothing is cancelled, ``run()`` returns after every bundle and monitor has ended and
  re-raises the first error as itself (never an exception group). No task is left behind.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .events import ExecutionEvent

__all__ = ["Supervisor"]

logger = logging.getLogger("agl_async.execution")


@dataclass
class _Bundle:
    name: str
    fn: Callable[..., Awaitable[Any]]
    args: tuple[Any, ...]
    on_return: Callable[[], None] | None


class Supervisor:
    """One run's in-process bundles, monitors and stop logic (see the module docstring)."""

    def __init__(self, event: ExecutionEvent, grace: float, grace_name: str) -> None:
        self.event = event
        self.grace = grace
        self.grace_name = grace_name
        self.first_error: BaseException | None = None
        self.first_error_source = ""
        self.caller_cancelled = False
        self.on_stop: Callable[[], Coroutine[Any, Any, None]] | None = None
        self.on_bundles_done: Callable[[], None] | None = None
        self.bundles_done = anyio.Event()
        self._bundles: list[_Bundle] = []
        self._monitors: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._live: set[str] = set()
        self._grace_scope = anyio.CancelScope()
        self._finished = False

    def add_bundle(
        self,
        name: str,
        fn: Callable[..., Awaitable[Any]],
        *args: Any,
        on_return: Callable[[], None] | None = None,
    ) -> None:
        self._bundles.append(_Bundle(name, fn, args, on_return))

    def drop_bundles(self) -> None:
        """Forget the bundles added so far (the run failed before they could start)."""
        self._bundles.clear()

    def add_monitor(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._monitors.append(fn)

    def fail(self, source: str, exc: BaseException, *, traceback: bool = True) -> None:
        """Record ``exc`` (the first one wins) and set the event."""
        info = exc if traceback else None
        if self.first_error is None:
            self.first_error, self.first_error_source = exc, source
            logger.error("%s failed: %r; stopping the run", source, exc, exc_info=info)
        else:
            logger.error(
                "%s failed too: %r (the first error, from %s, will be raised)",
                source,
                exc,
                self.first_error_source,
                exc_info=info,
            )
        self.event.set()

    async def run(self) -> None:
        async with anyio.create_task_group() as exposed:
            exposed.start_soon(self._watch_caller)
            exposed.start_soon(self._shielded_work, exposed)
        # Reached only when the caller did not cancel us.
        if self.first_error is not None:
            raise self.first_error

    async def _watch_caller(self) -> None:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            if not self._finished:
                self.caller_cancelled = True
                logger.warning("run cancelled by the caller; shutting down")
                self.event.set()
            raise

    async def _shielded_work(self, exposed: TaskGroup) -> None:
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as control:
                control.start_soon(self._stopper)
                async with anyio.create_task_group() as work:
                    work.start_soon(self._run_bundles)
                    for monitor in self._monitors:
                        work.start_soon(monitor)
                control.cancel_scope.cancel()
        self._finished = True
        exposed.cancel_scope.cancel()

    async def _stopper(self) -> None:
        await self.event.wait()
        if not self.bundles_done.is_set():
            self._grace_scope.deadline = anyio.current_time() + self.grace
            logger.info(
                "stop event set; %s get %.3g s (%s) to return before they are cancelled",
                ", ".join(sorted(self._live)) or "no bundles",
                self.grace,
                self.grace_name,
            )
        if self.on_stop is not None:
            await self.on_stop()

    async def _run_bundles(self) -> None:
        try:
            with self._grace_scope:
                async with anyio.create_task_group() as tg:
                    for bundle in self._bundles:
                        self._live.add(bundle.name)
                        tg.start_soon(self._guard, bundle)
            if self._grace_scope.cancelled_caught:
                logger.warning("grace period over: cancelled %s", ", ".join(sorted(self._live)) or "nothing")
        finally:
            self.bundles_done.set()
            if self.on_bundles_done is not None:
                self.on_bundles_done()

    async def _guard(self, bundle: _Bundle) -> None:
        try:
            await bundle.fn(*bundle.args)
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:  # bundles may raise anything, KeyboardInterrupt included
            self._live.discard(bundle.name)
            # A store that cannot be reached (after the client's retries) is an operational
            # failure whose message says it all (endpoint, tries): logged without a traceback.
            self.fail(bundle.name, exc, traceback=not isinstance(exc, ConnectionError))
        else:
            self._live.discard(bundle.name)
            logger.info("%s returned", bundle.name)
            if bundle.on_return is not None:
                bundle.on_return()

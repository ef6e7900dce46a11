"""``RunnerFleet``: the runner actors of one run on a Ray cluster, watched, restarted and stopped.

Driver side of :mod:`agl_async.execution.ray_actor`. It needs Ray (imported here at module level:
this module is only imported when a Ray fleet is used) and an asyncio loop (Ray's object
references are awaited as asyncio futures).

Life of a fleet:

* :meth:`RunnerFleet.start` creates ``n_runners`` named async actors, each with the caller's
  ``runner_options`` (e.g. ``{"num_cpus": 1}``) and ``max_restarts``. Creation does not block:
  Ray schedules the actors while the run goes on.
* :meth:`RunnerFleet.watch` (one supervisor monitor per actor) calls ``run()`` on its actor and
  waits for it, holding a ``wait_stopped()`` call beside it that relays the actor's event to the
  run's (a bundle calling ``event.set()`` stops the whole run, as in the other strategies). The
  outcome of ``run()``:

  - it returns: that runner is done (the run goes on);
  - it raises: Ray wraps the bundle's exception; the original (``RayTaskError.cause``) is
    reported to the supervisor, which re-raises the first error of the run as itself;
  - the actor is *unavailable* (its process died and Ray is restarting it, within
    ``max_restarts``): ``run()`` is sent again and runs on the new incarnation; the attempts the
    dead one had in flight stop heart-beating and are recovered by the store's watchdog
    (``RolloutConfig.unresponsive_seconds``);
  - the actor is *dead* (past its restarts, or killed for good by someone else): a
    ``RuntimeError`` naming the actor is reported.

* :meth:`RunnerFleet.stop` (the supervisor's stop hook, run once the run's event is set): ``stop()``
  on every actor and ``graceful_timeout`` for their runners to return; then ``ray.cancel`` of the
  ``run()`` calls still going (an asyncio cancellation inside the actor) and ``terminate_timeout``;
  then ``ray.kill`` and ``terminate_timeout`` for Ray to report them dead.
* :meth:`RunnerFleet.close` (always, shielded, after the supervisor is done) kills every actor of
  the fleet — finished ones are idle processes — and waits, bounded by ``terminate_timeout``, until
  Ray reports each of them dead. No actor of the run outlives it.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import ray
import ray.exceptions as rex

from .events import ExecutionEvent
from .ray_actor import RunnerActor, StoreSpec
from .supervision import Supervisor

__all__ = ["RESERVED_OPTIONS", "RunnerFleet", "check_runner_options"]

logger = logging.getLogger("agl_async.execution.ray")

RESERVED_OPTIONS = frozenset(
    {"name", "namespace", "lifetime", "max_restarts", "max_task_retries", "get_if_exists"}
)
"""Actor options the fleet sets itself (``max_restarts`` has its own parameter)."""


def _actor_class() -> Any:
    # Made anew for each use: an actor class made during one Ray session is tied to it, and a
    # process may join another cluster after ray.shutdown().
    return ray.remote(RunnerActor)


def check_runner_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``runner_options`` as a dict, checked by Ray's own option validation; ``ValueError`` for a
    non-mapping, a reserved option, or an option Ray rejects."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(
            f"runner_options must be a mapping of Ray actor options, got {type(options).__name__}"
        )
    reserved = sorted(RESERVED_OPTIONS & set(options))
    if reserved:
        raise ValueError(
            f"runner_options may not set {', '.join(reserved)}: the strategy sets them "
            "(use max_restarts= for restarts)"
        )
    try:
        _actor_class().options(**options)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"invalid runner_options {dict(options)!r}: {exc}") from None
    return dict(options)


def _original(exc: rex.RayTaskError) -> BaseException:
    """The exception a bundle raised inside the actor (Ray wraps it in ``RayTaskError``)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _first_line(exc: BaseException) -> str:
    """Ray's summary of an error: its unindented lines (what happened and why; the indented ones
    are identifiers), joined and shortened."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line[:1].isspace()]
    text = " ".join(lines) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


class RunnerFleet:
    """``n_runners`` runner actors of one run (see the module docstring)."""

    def __init__(
        self,
        runner: bytes,
        store: StoreSpec,
        n_runners: int,
        event: ExecutionEvent,
        *,
        runner_options: Mapping[str, Any] | None = None,
        max_restarts: int = 0,
        graceful_timeout: float = 10.0,
        terminate_timeout: float = 10.0,
    ) -> None:
        self.run_id = uuid.uuid4().hex[:8]
        self.names = [f"agl-async-{self.run_id}-runner-{i}" for i in range(n_runners)]
        self._runner = runner
        self._store = store
        self._event = event
        self._options = check_runner_options(runner_options)
        self.max_restarts = max_restarts
        self.graceful_timeout = graceful_timeout
        self.terminate_timeout = terminate_timeout
        self._actors: list[Any] = []
        self._refs: list[Any] = [None] * n_runners
        self._done = [anyio.Event() for _ in range(n_runners)]
        self._abort = [anyio.CancelScope() for _ in range(n_runners)]
        self._killed: set[int] = set()
        self._stopping = False
        self._supervisor: Supervisor | None = None

    def __repr__(self) -> str:
        return f"RunnerFleet({self.run_id}, n_runners={len(self.names)}, max_restarts={self.max_restarts})"

    # ------------------------------------------------------------------ start
    def start(self, supervisor: Supervisor) -> None:
        """Create the actors and register one monitor per actor with ``supervisor``."""
        self._supervisor = supervisor
        cls = _actor_class()
        for i, name in enumerate(self.names):
            handle = cls.options(
                name=name, max_restarts=self.max_restarts, max_task_retries=0, **self._options
            ).remote(self._runner, self._store, i, name)
            self._actors.append(handle)
        for i in range(len(self.names)):
            supervisor.add_monitor(lambda i=i: self.watch(i))  # type: ignore[misc]
        logger.info("placed %d runner actors: %s", len(self.names), ", ".join(self.names))

    def _fail(self, source: str, exc: BaseException, *, traceback: bool = True) -> None:
        assert self._supervisor is not None
        self._supervisor.fail(source, exc, traceback=traceback)

    # ------------------------------------------------------------------ watch
    async def watch(self, i: int) -> None:
        """Run actor ``i``'s bundle to its end, re-sending ``run()`` after each restart."""
        name, handle = self.names[i], self._actors[i]
        restarts = 0
        try:
            with self._abort[i]:
                while True:
                    try:
                        event_was_set = await self._run_once(i, handle)
                    except rex.TaskCancelledError:
                        if not self._stopping:
                            self._fail(name, RuntimeError(f"runner actor {name}: its run() was cancelled"))
                        # Resolved at once by ray.cancel: the bundle may still be unwinding.
                        with contextlib.suppress(rex.RayError):
                            await handle.wait_finished.remote()
                        return
                    except rex.RayTaskError as exc:
                        self._fail(name, _original(exc))
                        return
                    except rex.ActorUnavailableError as exc:
                        if self._stopping or i in self._killed:
                            return
                        restarts += 1
                        logger.warning(
                            "runner actor %s is unavailable (%s); Ray restarts it (restart %d, "
                            "max_restarts=%d) and its runner starts again; the attempts it had in "
                            "flight are recovered by the store's watchdog",
                            name,
                            _first_line(exc),
                            restarts,
                            self.max_restarts,
                        )
                        continue
                    except rex.RayActorError as exc:
                        if i in self._killed:
                            return
                        error = RuntimeError(
                            f"runner actor {name} (runner {i}) was lost after {restarts} restart(s) "
                            f"(max_restarts={self.max_restarts}): {_first_line(exc)}"
                        )
                        error.__cause__ = exc
                        self._fail(name, error, traceback=False)
                        return
                    if event_was_set:
                        self._event.set()
                    logger.info("runner actor %s returned", name)
                    return
        finally:
            self._done[i].set()

    async def _run_once(self, i: int, handle: Any) -> bool:
        ref = handle.run.remote()
        self._refs[i] = ref
        result = False
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._relay_event, handle)
            try:
                result = await ref
            except Exception as exc:  # re-raised below, outside the task group (no ExceptionGroup)
                error = exc
            tg.cancel_scope.cancel()
        if error is not None:
            raise error
        return result

    async def _relay_event(self, handle: Any) -> None:
        try:
            await handle.wait_stopped.remote()
        except rex.RayError:
            return  # the actor died: its watcher reports that
        self._event.set()

    # ------------------------------------------------------------------ stop
    def _alive(self) -> list[int]:
        return [i for i, done in enumerate(self._done) if not done.is_set()]

    async def _all_done_within(self, seconds: float) -> bool:
        with anyio.move_on_after(seconds):
            for done in self._done:
                await done.wait()
            return True
        return False

    async def stop(self, on_signalled: Callable[[], None] | None = None) -> None:
        """The escalation: ``stop()``, ``graceful_timeout``; ``ray.cancel``, ``terminate_timeout``;
        ``ray.kill``, ``terminate_timeout``. Returns once every watcher has ended.
        ``on_signalled`` runs right after the actors were asked to stop (the strategy makes the
        server answer long polls at once there, so idle runners see their event promptly)."""
        self._stopping = True
        for handle in self._actors:
            handle.stop.remote()
        if on_signalled is not None:
            on_signalled()
        if not self._alive():
            return
        logger.info(
            "stopping runner actors %s: waiting up to %.3g s (graceful_timeout)",
            ", ".join(self.names[i] for i in self._alive()),
            self.graceful_timeout,
        )
        if await self._all_done_within(self.graceful_timeout):
            return
        survivors = self._alive()
        logger.warning(
            "runner actors %s still running after %.3g s (graceful_timeout): ray.cancel",
            ", ".join(self.names[i] for i in survivors),
            self.graceful_timeout,
        )
        for i in survivors:
            if self._refs[i] is not None:
                ray.cancel(self._refs[i])
        if await self._all_done_within(self.terminate_timeout):
            return
        survivors = self._alive()
        logger.warning(
            "runner actors %s still running after %.3g s (terminate_timeout): ray.kill",
            ", ".join(self.names[i] for i in survivors),
            self.terminate_timeout,
        )
        for i in survivors:
            self._killed.add(i)
            ray.kill(self._actors[i], no_restart=True)
        if await self._all_done_within(self.terminate_timeout):
            return
        survivors = self._alive()
        logger.error(
            "Ray has not reported runner actors %s dead %.3g s after ray.kill; no longer waiting for them",
            ", ".join(self.names[i] for i in survivors),
            self.terminate_timeout,
        )
        for i in survivors:
            self._abort[i].cancel()

    # ------------------------------------------------------------------ close
    async def close(self) -> None:
        """Kill every actor of the fleet and wait (``terminate_timeout``) until Ray reports each
        dead. Idempotent; call it shielded."""
        for i, handle in enumerate(self._actors):
            if i not in self._killed:
                self._killed.add(i)
                ray.kill(handle, no_restart=True)

        async def confirm(handle: Any) -> None:
            # ray.kill is asynchronous: a call may still be answered until the kill lands.
            while True:
                try:
                    await handle.__ray_ready__.remote()
                except rex.RayError:  # ActorDiedError: gone
                    return
                await anyio.sleep(0.05)

        with anyio.move_on_after(self.terminate_timeout) as scope:
            async with anyio.create_task_group() as tg:
                for handle in self._actors:
                    tg.start_soon(confirm, handle)
        if scope.cancelled_caught:
            logger.error(
                "Ray has not confirmed the end of every runner actor of %r within %.3g s",
                self,
                self.terminate_timeout,
            )

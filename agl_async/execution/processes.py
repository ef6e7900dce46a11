"""Child processes of the client-server strategy: spawning, watching, cleaning up.

* Children are ``aiomultiprocess.Process`` objects (spawn start method by default) whose
  process entry point is :func:`child_main`: it runs the target coroutine with ``anyio.run`` on
  asyncio and turns a SIGINT into a cancellation of that coroutine (exit code 0), so that the
  SIGINT step of the shutdown is a clean stop for a child that is awaiting something. They are
  made by :func:`~agl_async.execution._aiomp.new_process`, without aiomultiprocess's ``Manager``:
  a run starts no process besides its children (and multiprocessing's resource tracker).
* A :class:`Lifeline` ties every child to this process: if the parent dies without shutting
  the run down (SIGKILL, a crash), the children cancel their bundle and exit by themselves.
* :class:`Child` watches its process by waiting for the process sentinel to become readable
  (``anyio.wait_readable``: no polling, unlike ``aiomultiprocess.Process.join``), then reaps it and
  records the exit code.
* Stopping them is :mod:`agl_async.execution.shutdown`'s (the four-step escalation).
* :class:`MultiprocessingHelpers` accounts for what spawning starts in *this* process besides
  the children — multiprocessing's resource tracker — and shuts it down when we started it, once
  the last run that uses it has ended, so nothing started by a run outlives it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from multiprocessing import resource_tracker
from multiprocessing.reduction import ForkingPickler
from typing import Any

import aiomultiprocess
import anyio

from ._aiomp import new_process
from ._sigint import cancel_on_sigint

__all__ = [
    "DEFINE_AT_MODULE_LEVEL",
    "Child",
    "Lifeline",
    "MultiprocessingHelpers",
    "check_picklable",
    "child_main",
    "spawn",
]

logger = logging.getLogger("agl_async.execution.cs")

DEFINE_AT_MODULE_LEVEL = (
    "Child processes are started with the 'spawn' method: define bundles at module level (not inside "
    "a function, not as a lambda or closure) in an importable module, and keep everything they "
    "reference picklable."
)


def check_picklable(what: str, obj: Any, hint: str) -> None:
    """Raise ``TypeError`` naming ``what`` when ``obj`` cannot travel to a spawned process."""
    module = getattr(obj, "__module__", None)
    if callable(obj) and module == "__main__" and not getattr(sys.modules.get("__main__"), "__file__", None):
        raise TypeError(
            f"{what} {obj!r} is defined in an interactive __main__, which a spawned process cannot "
            f"import. {hint}"
        )
    try:
        ForkingPickler.dumps(obj, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(f"{what} {obj!r} cannot be sent to a child process ({exc}). {hint}") from exc


class Lifeline:
    """A pipe whose write end only the parent holds; each child gets the read end.

    The read end turns readable (end of file) once every copy of the write end is closed: when
    the run closes it, or when the parent dies in any way (SIGKILL included). A child then
    cancels its bundle and exits, so that no runner is orphaned by a parent that could not
    shut it down. Pickles only while a child is being spawned (the descriptor is passed by the
    start method).
    """

    def __init__(self) -> None:
        self._r, self._w = os.pipe()

    def __reduce__(self) -> Any:
        from multiprocessing import context, reduction

        context.assert_spawning(self)
        return _ParentWatch, (reduction.DupFd(self._r),)

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._r = self._w = -1


class _ParentWatch:
    """The child's end of a :class:`Lifeline`."""

    def __init__(self, fd: Any) -> None:
        self.fd: int = fd.detach()

    async def parent_gone(self) -> None:
        await anyio.wait_readable(self.fd)


async def _run_tied_to_parent(
    target: Callable[..., Awaitable[None]], args: tuple[Any, ...], watch: Any
) -> None:
    """Await ``target(*args)``, cancelled if the parent process goes away first."""
    if watch is None:
        await target(*args)
        return
    errors: list[BaseException] = []
    async with anyio.create_task_group() as tg:

        async def watch_parent() -> None:
            await watch.parent_gone()
            logger.warning(
                "%s (pid %d): parent process gone; cancelling",
                multiprocessing.current_process().name,
                os.getpid(),
            )
            tg.cancel_scope.cancel()

        tg.start_soon(watch_parent)
        try:
            await target(*args)
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:  # re-raised as itself, outside the task group
            errors.append(exc)
        finally:
            tg.cancel_scope.cancel()
    if errors:
        raise errors[0]


# ---------------------------------------------------------------------------- inside the child
def _configure_child_logging(level: int) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(processName)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("agl_async").setLevel(level)


def child_main(unit: Any) -> None:
    """Process entry point (``process_target`` of aiomultiprocess): run ``unit.target`` on asyncio.

    Exit code 0 when the coroutine returns or is cancelled by SIGINT; 1 when it raises (the
    error is logged here, in the child). Once the coroutine has ended, further SIGINTs are
    ignored: a terminal's second Ctrl-C reaches the whole process group while the child winds
    down (event loop teardown, interpreter exit) and must not turn its clean stop into a
    ``KeyboardInterrupt`` traceback or a death by SIGINT (exit code -2).
    """
    name = multiprocessing.current_process().name
    kwargs = dict(unit.kwargs)
    _configure_child_logging(kwargs.pop("log_level", logging.WARNING))
    watch = kwargs.pop("lifeline", None)
    try:
        interrupted = anyio.run(
            cancel_on_sigint, _run_tied_to_parent, unit.target, tuple(unit.args), watch, backend="asyncio"
        )
    except KeyboardInterrupt:  # a further SIGINT after the watcher had stopped: already stopping
        interrupted = True
    except Exception:
        logger.exception("%s (pid %d) failed", name, os.getpid())
        sys.exit(1)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if interrupted:
        logger.info("%s (pid %d): SIGINT cancelled it; exiting", name, os.getpid())


# ---------------------------------------------------------------------------- in the parent
class Child:
    """One spawned child process and the task that watches it exit."""

    def __init__(self, name: str, process: aiomultiprocess.Process) -> None:
        self.name = name
        self.process = process
        self.pid: int = process.pid
        self.exitcode: int | None = None
        self.exited = anyio.Event()

    def __repr__(self) -> str:
        return f"{self.name} (pid {self.pid})"

    async def watch(self, on_exit: Callable[[Child], None]) -> None:
        """Wait until the process ends (its sentinel becomes readable), reap it, call ``on_exit``."""
        try:
            await anyio.wait_readable(self.process.aio_process.sentinel)
            self.process.aio_process.join()  # reaps at once: the sentinel said it has ended
            self.exitcode = self.process.exitcode
            self.process.close()  # releases the sentinel descriptor now rather than at GC
            logger.info("%r exited with code %s", self, self.exitcode)
        finally:
            self.exited.set()
        on_exit(self)

    def interrupt(self) -> None:
        """SIGINT: the child cancels its bundle and exits 0 (see :func:`child_main`)."""
        self._send(lambda: os.kill(self.pid, signal.SIGINT))

    def terminate(self) -> None:
        self._send(self.process.terminate)

    def kill(self) -> None:
        self._send(self.process.kill)

    @staticmethod
    def _send(send: Callable[[], None]) -> None:
        try:
            send()
        except (ProcessLookupError, ValueError):  # it has just ended
            pass


def spawn(
    specs: Sequence[tuple[str, Callable[..., Awaitable[None]], tuple[Any, ...]]],
    into: list[Child],
    lifeline: Lifeline | None = None,
) -> None:
    """Start one child per ``(name, coroutine function, args)``; blocking (run it in a thread).

    Each started child is appended to ``into`` at once, so that the caller can stop the ones
    already started when a later one fails to start. With ``lifeline``, each child stops by
    itself once the lifeline is closed or this process is gone.
    """
    level = logging.getLogger("agl_async").getEffectiveLevel()
    for name, target, args in specs:
        kwargs: dict[str, Any] = {"log_level": level}
        if lifeline is not None:
            kwargs["lifeline"] = lifeline
        process = new_process(target, args, kwargs, name=name, process_target=child_main)
        process.start()
        child = Child(name, process)
        into.append(child)
        logger.info("spawned %r", child)


class MultiprocessingHelpers:
    """Reference-counted ownership of multiprocessing's resource tracker (see the module
    docstring). ``acquire()`` before spawning, ``release()`` (blocking: run it in a thread) after
    every child has exited."""

    _lock = threading.Lock()
    _users = 0
    _own_tracker = False

    @classmethod
    def acquire(cls) -> None:
        with cls._lock:
            if cls._users == 0:
                cls._own_tracker = getattr(resource_tracker._resource_tracker, "_fd", None) is None
            cls._users += 1

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users > 0:
                return
            tracker, cls._own_tracker = cls._own_tracker, False
            if tracker and getattr(resource_tracker._resource_tracker, "_fd", None) is not None:
                logger.info("stopping the multiprocessing resource tracker started by this run")
                _stop_resource_tracker()


def _stop_resource_tracker() -> None:
    # The tracker exits when every holder of its pipe has closed it; all our children are gone,
    # so closing ours ends it. ResourceTracker._stop() does exactly this (close, waitpid).
    tracker = resource_tracker._resource_tracker
    stop = getattr(tracker, "_stop", None)
    if stop is not None:
        stop()

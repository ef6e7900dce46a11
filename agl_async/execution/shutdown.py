"""The four-step shutdown of a run's child processes, and its steps by name.

:func:`escalate` (the client-server strategy's stop hook, beside the grace period of
:class:`~agl_async.execution.supervision.Supervisor`): set the event and wait
``graceful_timeout``; then, for each :class:`Step` in turn — SIGINT, ``terminate()``, ``kill()`` —
send it to the children still running and wait ``terminate_timeout``. It returns as soon as every
child has exited. Each wait is an ``anyio.move_on_after`` deadline on the children's exit events
(set by their watchers), so nothing polls. Cancelling ``escalate`` stops the escalation where it
is; the caller's clean-up then reaps what is left.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence

import anyio

from .events import ExecutionEvent
from .processes import Child

__all__ = ["Step", "escalate"]

logger = logging.getLogger("agl_async.execution.cs")


class Step(enum.Enum):
    """What the escalation sends to children still running after the grace period, in order."""

    SIGINT = "SIGINT"
    TERMINATE = "terminate()"
    KILL = "kill()"

    def send(self, child: Child) -> None:
        if self is Step.SIGINT:
            child.interrupt()
        elif self is Step.TERMINATE:
            child.terminate()
        else:
            child.kill()


async def _all_exited(children: Sequence[Child], timeout: float) -> bool:
    with anyio.move_on_after(timeout):
        for child in children:
            await child.exited.wait()
        return True
    return False


async def escalate(
    children: Sequence[Child], event: ExecutionEvent, graceful_timeout: float, terminate_timeout: float
) -> bool:
    """The four-step shutdown of ``children``; ``True`` when all of them have exited."""
    event.set()

    def alive() -> list[Child]:
        return [c for c in children if not c.exited.is_set()]

    # The grace period first (nothing sent but the event), then each step, with its own wait.
    stages: list[tuple[Step | None, float, str]] = [(None, graceful_timeout, "graceful_timeout")]
    stages += [(step, terminate_timeout, "terminate_timeout") for step in Step]
    waited, waited_name = 0.0, ""
    for step, timeout, timeout_name in stages:
        survivors = alive()
        if not survivors:
            return True
        names = ", ".join(map(repr, survivors))
        if step is None:
            logger.info(
                "stopping %s: stop event set, waiting up to %.3g s (%s)", names, timeout, "graceful_timeout"
            )
        else:
            logger.warning(
                "%s still running after %.3g s (%s): escalating to %s", names, waited, waited_name, step.value
            )
            for child in survivors:
                step.send(child)
        if await _all_exited(survivors, timeout):
            return True
        waited, waited_name = timeout, timeout_name
    logger.error("%s did not exit even after kill()", ", ".join(map(repr, alive())))
    return False

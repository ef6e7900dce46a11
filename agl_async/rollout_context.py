"""Which rollout the code running now belongs to: :func:`current_rollout`.

While a runner slot (:mod:`agl_async.concurrency`) runs an agent, the agent's code — and every
task or worker thread it starts, which copy the context — can ask which rollout it is working on,
which attempt, through which store, as which worker: to write spans of its own
(``store.add_many_spans``), to read the rollout's metadata, or to tag its logs. Outside a rollout
the answer is ``None``. It is a :class:`contextvars.ContextVar`, so concurrent slots each see their
own rollout.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import NamedTuple

from .store.base import LightningStore
from .types import AttemptedRollout, WorkerId

__all__ = ["RolloutContext", "current_rollout"]


class RolloutContext(NamedTuple):
    """The rollout an agent call works on."""

    store: LightningStore
    rollout: AttemptedRollout
    worker_id: WorkerId

    @property
    def rollout_id(self) -> str:
        return self.rollout.rollout_id

    @property
    def attempt_id(self) -> str:
        return self.rollout.attempt.attempt_id


_current: ContextVar[RolloutContext | None] = ContextVar("agl_async_current_rollout", default=None)


def current_rollout() -> RolloutContext | None:
    """The rollout the calling code runs for (inside an agent call of the runner), else ``None``."""
    return _current.get()

"""``LightningStore``: the abstract control plane shared by the algorithm and the runners.

Names, parameters and meaning follow Agent-Lightning 0.3.0's ``LightningStore`` so that code
written against it ports unchanged. Every method is a coroutine; implementations make each call
appear atomic to concurrent callers of the same event loop.

Error conventions, shared by every implementation (in-memory, locked, HTTP client):

* getters (``get_rollout_by_id``, ``get_latest_attempt``, ``get_resources_by_id``,
  ``get_worker_by_id``) return ``None`` for an unknown id;
* mutations (``update_*``, ``start_attempt``, ``add_span`` …) raise ``ValueError`` naming the
  unknown id, and invalid arguments raise ``ValueError`` *before* anything is changed.

Cancellation: cancelling a call to a store method never leaves a half-applied change; only
``wait_for_rollouts`` and the long-poll form of ``dequeue_rollout`` actually wait. Cancelling
``wait_for_rollouts`` changes nothing. Whether cancelling a waiting ``dequeue_rollout`` can lose a
claim depends on where the store is, and every store says so in
:attr:`LightningStore.long_poll_is_cancel_safe`: in-process stores claim without awaiting, so an
abandoned wait claimed nothing; over HTTP the server may have claimed a rollout for a request
that is being abandoned (it puts the claim back when it notices, but that is not guaranteed).
The runner loop races a cancel-safe long poll against its stop event, and otherwise polls in
short requests.
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Iterable, Mapping, Sequence
from operator import attrgetter
from typing import Any, Literal, cast, get_args

from .._validate import as_enqueue_requests, check_seconds
from ..types import (
    UNSET,
    Attempt,
    AttemptedRollout,
    AttemptStatus,
    EnqueueRolloutRequest,
    ResourcesUpdate,
    Rollout,
    RolloutConfig,
    RolloutMode,
    RolloutStatus,
    Span,
    Unset,
    Worker,
    WorkerId,
    WorkerStatus,
)

__all__ = [
    "ROLLOUT_SORT_FIELDS",
    "UNSET",
    "EnqueueRolloutRequest",
    "LightningStore",
    "RolloutSortField",
    "Unset",
    "check_rollout_query",
    "select_rollouts",
]


#: A field ``query_rollouts(sort_by=...)`` orders by.
RolloutSortField = Literal["rollout_id", "start_time", "end_time", "status"]
ROLLOUT_SORT_FIELDS: tuple[str, ...] = get_args(RolloutSortField)


class LightningStore(abc.ABC):
    """The control plane: rollout queue, attempts, spans, resources and workers.

    Subclasses implement every abstract coroutine. The batched forms have default
    implementations in terms of the single ones; stores with a cheaper bulk path override them.
    """

    #: Whether a ``dequeue_rollout(timeout=...)`` may be cancelled at any moment without a rollout
    #: being claimed for nobody (see the module docstring). ``False`` unless a store states it.
    long_poll_is_cancel_safe: bool = False

    # ------------------------------------------------------------------ rollouts and the queue
    @abc.abstractmethod
    async def enqueue_rollout(
        self,
        input: Any,
        mode: RolloutMode | None = None,
        resources_id: str | None = None,
        config: RolloutConfig | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Rollout:
        """Add a rollout in status ``"queuing"`` at the tail of the queue; no attempt yet.

        Without ``resources_id`` the rollout is bound to the latest resources at this moment
        (``None`` when there are none). An unknown ``resources_id`` raises ``ValueError``.
        """

    async def enqueue_many_rollouts(
        self, rollouts: Sequence[EnqueueRolloutRequest | Mapping[str, Any]]
    ) -> list[Rollout]:
        """Enqueue several rollouts, in order; each entry holds ``enqueue_rollout``'s parameters."""
        out = []
        for request in as_enqueue_requests(rollouts):
            mode = cast(RolloutMode | None, request.mode)  # a plain string: enqueue_rollout checks it
            out.append(
                await self.enqueue_rollout(
                    request.input, mode, request.resources_id, request.config, request.metadata
                )
            )
        return out

    @abc.abstractmethod
    async def dequeue_rollout(
        self, worker_id: WorkerId | None = None, *, timeout: float | None = None
    ) -> AttemptedRollout | None:
        """Claim the oldest queued rollout, or return ``None`` when the queue is empty.

        The claimed rollout becomes ``"preparing"`` with a new attempt (``sequence_id`` = number of
        earlier attempts + 1, status ``"preparing"``, ``worker_id`` recorded).

        Extension to Agent-Lightning's API, ``timeout`` (keyword-only): ``None`` or ``0`` returns
        at once (Agent-Lightning's behaviour); a positive number long-polls: wait up to that many
        seconds for a rollout to be queued (woken by the enqueue/requeue itself, not by polling)
        and return ``None`` only when none came. ``float("inf")`` waits without limit. Negative:
        ``ValueError``. Cancelling the wait claims nothing.
        """

    async def finish_and_dequeue(
        self,
        rollout_id: str,
        attempt_id: str,
        status: AttemptStatus = "succeeded",
        *,
        worker_id: WorkerId | None = None,
        timeout: float | None = None,
    ) -> AttemptedRollout | None:
        """Extension: end an attempt and claim the next rollout in one call.

        Equivalent to ``update_attempt(rollout_id, attempt_id, status=status)`` followed by
        ``dequeue_rollout(worker_id=worker_id, timeout=timeout)``; the HTTP client sends it as one
        request, which saves a round trip per rollout for runners. When the update raises
        (``ValueError`` for an unknown id or status) nothing is dequeued.
        """
        check_seconds(timeout)  # before changing anything
        await self.update_attempt(rollout_id, attempt_id, status=status)
        return await self.dequeue_rollout(worker_id=worker_id, timeout=timeout)

    async def unclaim_rollout(self, rollout_id: str, attempt_id: str) -> bool:
        """Extension: undo a claim whose runner never received it (e.g. its long poll's client
        disconnected while the claim was being answered).

        When ``attempt_id`` is still the rollout's latest attempt and still ``"preparing"``, the
        attempt is removed and the rollout goes back to the *head* of the queue in its queue
        status, as if it had never been dequeued; returns ``True``. Otherwise (the runner got it
        after all and started it, or the store cannot undo claims) returns ``False`` and changes
        nothing. The default implementation cannot undo anything.
        """
        return False

    async def dequeue_many_rollouts(
        self, *, limit: int = 1, worker_id: WorkerId | None = None
    ) -> list[AttemptedRollout]:
        """Claim up to ``limit`` rollouts in FIFO order (fewer when the queue runs out)."""
        out: list[AttemptedRollout] = []
        for _ in range(max(limit, 0)):
            claimed = await self.dequeue_rollout(worker_id=worker_id)
            if claimed is None:
                break
            out.append(claimed)
        return out

    @abc.abstractmethod
    async def start_rollout(
        self,
        input: Any,
        mode: RolloutMode | None = None,
        resources_id: str | None = None,
        config: RolloutConfig | None = None,
        metadata: dict[str, Any] | None = None,
        worker_id: WorkerId | None = None,
    ) -> AttemptedRollout:
        """Create a rollout and claim it in one step (it never visits the queue)."""

    @abc.abstractmethod
    async def start_attempt(self, rollout_id: str, worker_id: WorkerId | None = None) -> AttemptedRollout:
        """Make a new attempt of an existing rollout outside the queue (a manual retry)."""

    @abc.abstractmethod
    async def update_rollout(
        self,
        rollout_id: str,
        input: Any | Unset = UNSET,
        mode: RolloutMode | Unset | None = UNSET,
        resources_id: str | Unset | None = UNSET,
        status: RolloutStatus | Unset = UNSET,
        config: RolloutConfig | Unset = UNSET,
        metadata: dict[str, Any] | Unset | None = UNSET,
    ) -> Rollout:
        """Replace the given fields. A terminal status stamps ``end_time`` and wakes waiters; a
        queue status (``queuing``/``requeuing``) puts the rollout back in the queue exactly once."""

    @abc.abstractmethod
    async def update_attempt(
        self,
        rollout_id: str,
        attempt_id: str | Literal["latest"],
        status: AttemptStatus | Unset = UNSET,
        worker_id: WorkerId | Unset | None = UNSET,
        last_heartbeat_time: float | Unset = UNSET,
        metadata: dict[str, Any] | Unset | None = UNSET,
    ) -> Attempt:
        """Update an attempt (``"latest"`` = highest ``sequence_id``); counts as a heartbeat.

        When the attempt is the rollout's latest, its status drives the rollout's: ``preparing``,
        ``running`` and ``succeeded`` carry over; ``failed``, ``timeout`` and ``unresponsive`` send
        the rollout back to the queue (``requeuing``) when the status is in the config's
        ``retry_condition`` and ``sequence_id < max_attempts``, and fail it otherwise.
        """

    @abc.abstractmethod
    async def wait_for_rollouts(
        self, *, rollout_ids: list[str], timeout: float | None = None
    ) -> list[Rollout]:
        """Wait until all ``rollout_ids`` are terminal or ``timeout`` seconds pass; return the
        terminal ones (in the order asked). ``timeout=None`` waits without limit, ``0`` only looks.
        Unknown ids are not waited for (they can never finish) and are left out of the result.

        Woken by the status change itself (no polling). Cancelling the wait changes nothing.
        """

    @abc.abstractmethod
    async def get_rollout_by_id(self, rollout_id: str) -> Rollout | None: ...

    @abc.abstractmethod
    async def query_rollouts(
        self,
        *,
        status_in: Sequence[RolloutStatus] | None = None,
        rollout_id_in: Sequence[str] | None = None,
        rollout_id_contains: str | None = None,
        sort_by: RolloutSortField | None = None,
        sort_order: Literal["asc", "desc"] = "asc",
        limit: int = -1,
        offset: int = 0,
    ) -> list[Rollout]:
        """Rollouts in creation order, filtered by status and/or id when given.

        The filters combine with "and": ``status_in`` (statuses), ``rollout_id_in`` (ids) and
        ``rollout_id_contains`` (a substring of the id). ``sort_by`` (one of
        :data:`ROLLOUT_SORT_FIELDS`) orders by that field, ``sort_order="desc"`` being the exact
        reverse of ``"asc"``; ties keep creation order (reversed for ``desc``) and rollouts without
        a value (``end_time`` of an unfinished one) come last in both orders. ``offset`` skips
        that many matches, ``limit`` returns at most that many (``-1``: all). The names and
        meaning are Agent-Lightning 0.3's (its ``filter_logic="or"`` is not offered); stores
        that have nothing better can use :func:`select_rollouts`. Bad values: ``ValueError``.
        """

    @abc.abstractmethod
    async def query_attempts(self, rollout_id: str) -> list[Attempt]:
        """The attempts of a rollout by ``sequence_id`` (empty for an unknown rollout)."""

    @abc.abstractmethod
    async def get_latest_attempt(self, rollout_id: str) -> Attempt | None: ...

    # ------------------------------------------------------------------ spans
    @abc.abstractmethod
    async def add_span(self, span: Span) -> Span | None:
        """Store a span; it counts as a heartbeat of its attempt (a ``preparing`` or
        ``unresponsive`` attempt becomes ``running``). Unknown rollout/attempt: ``ValueError``.

        A span whose ``sequence_id`` is :data:`~agl_async.types.AUTO_SEQUENCE_ID` (0) gets the
        attempt's next sequence id from the store (as :meth:`get_next_span_sequence_id` would
        issue it), set on the returned span; any other value is kept as given."""

    async def add_many_spans(self, spans: Sequence[Span]) -> list[Span]:
        """Store several spans, in order (sequence ids to assign are assigned in that order)."""
        out = []
        for span in spans:
            stored = await self.add_span(span)
            if stored is not None:
                out.append(stored)
        return out

    @abc.abstractmethod
    async def query_spans(self, rollout_id: str, attempt_id: str | None = None) -> list[Span]:
        """Spans of a rollout ordered by attempt then ``sequence_id``; ``attempt_id`` narrows it to
        one attempt (``"latest"`` = the latest attempt)."""

    @abc.abstractmethod
    async def get_next_span_sequence_id(self, rollout_id: str, attempt_id: str) -> int:
        """Reserve the next span ``sequence_id`` of an attempt (1, 2, …; never issued twice)."""

    # ------------------------------------------------------------------ resources
    @abc.abstractmethod
    async def add_resources(self, resources: Mapping[str, Any]) -> ResourcesUpdate:
        """Store a new snapshot under a fresh id; it becomes the latest."""

    @abc.abstractmethod
    async def update_resources(self, resources_id: str, resources: Mapping[str, Any]) -> ResourcesUpdate:
        """Replace an existing snapshot (version + 1); it becomes the latest."""

    @abc.abstractmethod
    async def get_latest_resources(self) -> ResourcesUpdate | None: ...

    @abc.abstractmethod
    async def get_resources_by_id(self, resources_id: str) -> ResourcesUpdate | None: ...

    @abc.abstractmethod
    async def query_resources(self) -> list[ResourcesUpdate]:
        """Every snapshot, in creation order."""

    # ------------------------------------------------------------------ workers
    @abc.abstractmethod
    async def query_workers(self, *, status_in: Sequence[WorkerStatus] | None = None) -> list[Worker]: ...

    @abc.abstractmethod
    async def get_worker_by_id(self, worker_id: WorkerId) -> Worker | None: ...

    @abc.abstractmethod
    async def update_worker(
        self, worker_id: WorkerId, heartbeat_stats: dict[str, Any] | Unset = UNSET
    ) -> Worker:
        """Record a heartbeat of a worker (registering it on first contact); also a heartbeat of
        the attempt it currently holds."""

    # ------------------------------------------------------------------ misc
    @abc.abstractmethod
    async def statistics(self) -> dict[str, Any]:
        """Counts by status (``rollouts``, ``attempts``, ``workers``), queue length, totals."""

    async def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release what the store holds (connections, files). A no-op for in-memory stores."""


def check_rollout_query(
    rollout_id_contains: str | None, sort_by: str | None, sort_order: str, limit: int, offset: int
) -> None:
    """``ValueError`` for a ``query_rollouts`` argument out of its domain (before any work)."""
    if rollout_id_contains is not None and not isinstance(rollout_id_contains, str):
        raise ValueError(f"rollout_id_contains must be a string or None, got {rollout_id_contains!r}")
    if sort_by is not None and sort_by not in ROLLOUT_SORT_FIELDS:
        raise ValueError(f"sort_by must be one of {list(ROLLOUT_SORT_FIELDS)} or None, got {sort_by!r}")
    if sort_order not in ("asc", "desc"):
        raise ValueError(f"sort_order must be 'asc' or 'desc', got {sort_order!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < -1:
        raise ValueError(f"limit must be an integer >= 0, or -1 for no limit, got {limit!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an integer >= 0, got {offset!r}")


def select_rollouts(
    rollouts: Iterable[Rollout],
    *,
    status_in: Sequence[str] | None = None,
    rollout_id_contains: str | None = None,
    sort_by: str | None = None,
    sort_order: str = "asc",
    limit: int = -1,
    offset: int = 0,
) -> list[Rollout]:
    """``query_rollouts``' filtering, ordering and paging applied to ``rollouts`` (given in
    creation order, already narrowed by ``rollout_id_in`` if asked): what a store without a
    query engine of its own does. Returns the very objects given (copy them if they are yours)."""
    check_rollout_query(rollout_id_contains, sort_by, sort_order, limit, offset)
    wanted = None if status_in is None else frozenset(status_in)
    matches: Iterable[Rollout] = rollouts
    if wanted is not None:
        matches = (r for r in matches if r.status in wanted)
    if rollout_id_contains is not None:
        needle = rollout_id_contains
        matches = (r for r in matches if needle in r.rollout_id)
    if sort_by is not None:
        key = attrgetter(sort_by)
        present: list[Rollout] = []
        missing: list[Rollout] = []
        for r in matches:
            (missing if key(r) is None else present).append(r)
        present.sort(key=key)  # stable: ties stay in creation order
        if sort_order == "desc":
            present.reverse()
            missing.reverse()
        matches = present + missing
    stop = None if limit == -1 else offset + limit
    return list(itertools.islice(matches, offset, stop))

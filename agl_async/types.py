"""The data model: rollouts, attempts, spans, resources and workers.

Every model is a :class:`msgspec.Struct`. Constructing one does **not** validate field types
(that is what keeps the store's hot path cheap: a ``Span`` costs ~0.3 µs to build, against ~2 µs
for a validating pydantic model); decoding from JSON with :func:`from_json` does validate, so
anything arriving over the wire is checked once, at the edge. The store validates the values it
acts on (statuses, configs) itself.

Models are constructed with keyword arguments (``ResourcesUpdate`` also takes its two required
fields positionally) and round-trip through JSON with :func:`to_json` / :func:`from_json`.
"""

from __future__ import annotations

import time
from typing import Any, Literal, TypeVar, get_args

import msgspec
from msgspec import UNSET, UnsetType

__all__ = [
    "ATTEMPT_STATUSES",
    "AUTO_SEQUENCE_ID",
    "QUEUE_STATUSES",
    "ROLLOUT_STATUSES",
    "TERMINAL_ATTEMPT_STATUSES",
    "TERMINAL_ROLLOUT_STATUSES",
    "UNSET",
    "Attempt",
    "AttemptStatus",
    "AttemptedRollout",
    "EnqueueRolloutRequest",
    "ResourcesUpdate",
    "Rollout",
    "RolloutConfig",
    "RolloutMode",
    "RolloutStatus",
    "Span",
    "Unset",
    "Worker",
    "WorkerId",
    "WorkerStatus",
    "from_json",
    "to_builtins",
    "to_json",
]

RolloutStatus = Literal["queuing", "preparing", "running", "succeeded", "failed", "cancelled", "requeuing"]
AttemptStatus = Literal["preparing", "running", "succeeded", "failed", "unresponsive", "timeout"]
RolloutMode = Literal["train", "val", "test"]
WorkerStatus = Literal["idle", "busy", "unknown"]
#: Runners identify themselves by a string or an integer (runner bundles receive ``0 … n-1``).
WorkerId = str | int

ROLLOUT_STATUSES: frozenset[str] = frozenset(get_args(RolloutStatus))
ATTEMPT_STATUSES: frozenset[str] = frozenset(get_args(AttemptStatus))
#: A rollout in one of these statuses is finished for good; ``wait_for_rollouts`` returns it.
TERMINAL_ROLLOUT_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
#: An attempt in one of these statuses has ended (its worker is idle again).
TERMINAL_ATTEMPT_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "unresponsive", "timeout"})
#: A rollout in one of these statuses is waiting in the queue.
QUEUE_STATUSES: frozenset[str] = frozenset({"queuing", "requeuing"})


#: The marker for "leave this field as it is" in ``update_*`` calls, distinct from an explicit
#: ``None``. It is msgspec's own ``UNSET``, so the same object means "absent" in the store's API and
#: on the wire (a field left out of a request body); there is one instance, and it pickles as itself.
Unset = UnsetType


class _Model(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Base of all models: keyword construction, compact JSON (defaults omitted)."""


class RolloutConfig(_Model):
    """How the store supervises and retries the attempts of one rollout.

    ``max_attempts`` bounds the attempts (>= 1). An attempt ending in a status listed in
    ``retry_condition`` while attempts remain sends the rollout back to the queue (``requeuing``).
    ``unresponsive_seconds``: a live attempt with no heartbeat or span for that long becomes
    ``unresponsive``. ``timeout_seconds``: a live attempt older than that becomes ``timeout``.
    Invalid values raise ``ValueError`` at construction.
    """

    timeout_seconds: float | None = None
    unresponsive_seconds: float | None = None
    max_attempts: int = 1
    retry_condition: list[AttemptStatus] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ValueError(f"max_attempts must be an integer, got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        for name in ("timeout_seconds", "unresponsive_seconds"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
            ):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")
        if not isinstance(self.retry_condition, (list, tuple)):
            raise ValueError(f"retry_condition must be a list of statuses, got {self.retry_condition!r}")
        for status in self.retry_condition:
            if status not in ATTEMPT_STATUSES:
                raise ValueError(
                    f"unknown attempt status {status!r} in retry_condition; "
                    f"expected one of {sorted(ATTEMPT_STATUSES)}"
                )


class Rollout(_Model):
    """One task to run: its input, status, supervising config and the resources it is bound to."""

    rollout_id: str
    input: Any
    start_time: float = msgspec.field(default_factory=time.time)
    end_time: float | None = None
    mode: RolloutMode | None = None
    resources_id: str | None = None
    status: RolloutStatus = "queuing"
    config: RolloutConfig = msgspec.field(default_factory=RolloutConfig)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class Attempt(_Model):
    """One execution of a rollout by a worker; ``sequence_id`` counts the attempts from 1."""

    rollout_id: str
    attempt_id: str
    sequence_id: int
    start_time: float = msgspec.field(default_factory=time.time)
    end_time: float | None = None
    status: AttemptStatus = "preparing"
    worker_id: WorkerId | None = None
    last_heartbeat_time: float | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class AttemptedRollout(Rollout, kw_only=True):
    """A rollout together with the attempt just made of it (what ``dequeue_rollout`` returns)."""

    attempt: Attempt


class EnqueueRolloutRequest(_Model, forbid_unknown_fields=True):
    """The parameters of ``enqueue_rollout``: one entry of ``enqueue_many_rollouts``, and the
    request body of both over HTTP.

    ``mode`` is one of ``"train"``, ``"val"``, ``"test"`` (or ``None``); it is held as a plain string
    so that the store, wherever it runs, is what rejects a bad one, with the same message.
    """

    input: Any
    mode: str | None = None
    resources_id: str | None = None
    config: RolloutConfig | None = None
    metadata: dict[str, Any] | None = None


#: A span added with this ``sequence_id`` is numbered by the store (the attempt's next sequence id).
AUTO_SEQUENCE_ID = 0


class Span(_Model):
    """One traced operation of an attempt. ``sequence_id`` orders the spans of one attempt
    (:data:`AUTO_SEQUENCE_ID`: let the store number it when it is added).

    ``trace_id`` / ``span_id`` / ``parent_id`` are lowercase hex for spans from OpenTelemetry (32 /
    16 / 16 characters), times are seconds since the epoch, ``events`` are
    ``{"name", "time", "attributes"}`` mappings and ``status_code`` is OpenTelemetry's status.
    """

    rollout_id: str
    attempt_id: str
    sequence_id: int
    trace_id: str
    span_id: str
    name: str
    parent_id: str | None = None
    start_time: float | None = None
    end_time: float | None = None
    attributes: dict[str, Any] = msgspec.field(default_factory=dict)
    events: list[dict[str, Any]] = msgspec.field(default_factory=list)
    status_code: Literal["unset", "ok", "error"] = "unset"
    status_message: str | None = None


class ResourcesUpdate(msgspec.Struct, omit_defaults=True):
    """A named, versioned snapshot of resources (a mapping of names to JSON values)."""

    resources_id: str
    resources: dict[str, Any]
    create_time: float = msgspec.field(default_factory=time.time)
    update_time: float = msgspec.field(default_factory=time.time)
    version: int = 1


class Worker(_Model):
    """What the store knows of one runner: busy while it holds a live attempt, idle after."""

    worker_id: WorkerId
    status: WorkerStatus = "unknown"
    heartbeat_stats: dict[str, Any] | None = None
    last_heartbeat_time: float | None = None
    last_dequeue_time: float | None = None
    last_busy_time: float | None = None
    last_idle_time: float | None = None
    current_rollout_id: str | None = None
    current_attempt_id: str | None = None


_encoder = msgspec.json.Encoder()
T = TypeVar("T")


def to_json(obj: Any) -> bytes:
    """Encode a model (or any structure of models and JSON values) as compact JSON bytes."""
    return _encoder.encode(obj)


def from_json(data: bytes | str, type: type[T]) -> T:
    """Decode and validate JSON into ``type``; raises ``ValueError`` describing what was wrong."""
    try:
        return msgspec.json.decode(data, type=type)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ValueError(f"malformed JSON: {exc}") from None


def to_builtins(obj: Any) -> Any:
    """Convert models to plain dicts/lists (e.g. for printing or for another serialiser)."""
    return msgspec.to_builtins(obj)

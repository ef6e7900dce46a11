"""Rows of the PostgreSQL store and the models made from them.

``RolloutRow`` / ``AttemptRow`` are what a transaction holds of a locked rollout and one of its
attempts while it applies the status rules; the ``*_model`` functions turn fetched records
(asyncpg ``Record``, columns as in ``_postgres_sql``) into the public models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from ..types import (
    Attempt,
    AttemptedRollout,
    AttemptStatus,
    ResourcesUpdate,
    Rollout,
    RolloutConfig,
    Worker,
    WorkerId,
)
from . import _json

__all__ = [
    "AttemptRow",
    "RolloutRow",
    "attempt_model",
    "attempted_model",
    "config_of",
    "resources_model",
    "rollout_model",
    "wid",
    "wkey",
    "worker_model",
]


def wkey(worker_id: WorkerId) -> str:
    """A worker id as stored (JSON, so that ``0`` and ``"0"`` stay different workers)."""
    return _json.encode(worker_id, "worker_id")


def wid(key: str | None) -> WorkerId | None:
    if key is None:
        return None
    worker_id: WorkerId = msgspec.json.decode(key, type=WorkerId)
    return worker_id


def config_of(text: str) -> RolloutConfig:
    return msgspec.json.decode(text, type=RolloutConfig)


@dataclass
class RolloutRow:
    """A locked rollout row while a transaction works on it."""

    rollout_id: str
    status: str
    end_time: float | None
    config: RolloutConfig
    metadata: str
    queued: bool
    n_attempts: int
    latest_attempt_id: str | None
    record: Any
    #: How the next save moves it in the queue: to the tail, out of it, or not at all.
    queue_move: Literal["keep", "tail", "out"] = "keep"
    dirty: bool = False

    @classmethod
    def of(cls, rec: Any) -> RolloutRow:
        return cls(
            rollout_id=rec["rollout_id"],
            status=rec["status"],
            end_time=rec["end_time"],
            config=config_of(rec["config"]),
            metadata=rec["metadata"],
            queued=rec["queue_pos"] is not None,
            n_attempts=rec["n_attempts"],
            latest_attempt_id=rec["latest_attempt_id"],
            record=rec,
        )


@dataclass
class AttemptRow:
    """An attempt row while a transaction works on it."""

    rollout_id: str
    attempt_id: str
    sequence_id: int
    start_time: float
    end_time: float | None
    status: str
    worker_id: WorkerId | None
    last_heartbeat_time: float | None
    metadata: str
    timeout_s: float | None
    unresponsive_s: float | None
    deadline: float | None

    @classmethod
    def of(cls, rec: Any, prefix: str = "") -> AttemptRow:
        """From a record of ``ATTEMPT_COLS`` (named ``prefix + column``)."""
        return cls(
            rollout_id=rec[prefix + "rollout_id"],
            attempt_id=rec[prefix + "attempt_id"],
            sequence_id=rec[prefix + "sequence_id"],
            start_time=rec[prefix + "start_time"],
            end_time=rec[prefix + "end_time"],
            status=rec[prefix + "status"],
            worker_id=wid(rec[prefix + "worker_id"]),
            last_heartbeat_time=rec[prefix + "last_heartbeat_time"],
            metadata=rec[prefix + "metadata"],
            timeout_s=rec[prefix + "timeout_s"],
            unresponsive_s=rec[prefix + "unresponsive_s"],
            deadline=rec[prefix + "deadline"],
        )

    def verdict(self) -> tuple[AttemptStatus, float | None]:
        """The status the watchdog gives this attempt if nothing happens, and when (the earlier
        of its timeout and its silence limit; ``timeout`` when they coincide)."""
        verdict: AttemptStatus = "timeout"
        due: float | None = None
        if self.timeout_s is not None:
            due = self.start_time + self.timeout_s
        if self.unresponsive_s is not None:
            silent_due = (self.last_heartbeat_time or self.start_time) + self.unresponsive_s
            if due is None or silent_due < due:
                verdict, due = "unresponsive", silent_due
        return verdict, due

    def model(self) -> Attempt:
        return Attempt(
            rollout_id=self.rollout_id,
            attempt_id=self.attempt_id,
            sequence_id=self.sequence_id,
            start_time=self.start_time,
            end_time=self.end_time,
            status=self.status,  # type: ignore[arg-type]
            worker_id=self.worker_id,
            last_heartbeat_time=self.last_heartbeat_time,
            metadata=_json.decode(self.metadata),
        )


def rollout_model(rec: Any, **override: Any) -> Rollout:
    fields = {
        "rollout_id": rec["rollout_id"],
        "input": _json.decode(rec["input"]),
        "start_time": rec["start_time"],
        "end_time": rec["end_time"],
        "mode": rec["mode"],
        "resources_id": rec["resources_id"],
        "status": rec["status"],
        "config": config_of(rec["config"]),
        "metadata": _json.decode(rec["metadata"]),
    }
    fields.update(override)
    return Rollout(**fields)


def attempted_model(rollout: Rollout, attempt: Attempt) -> AttemptedRollout:
    return AttemptedRollout(**msgspec.structs.asdict(rollout), attempt=attempt)


def attempt_model(rec: Any) -> Attempt:
    return Attempt(
        rollout_id=rec["rollout_id"],
        attempt_id=rec["attempt_id"],
        sequence_id=rec["sequence_id"],
        start_time=rec["start_time"],
        end_time=rec["end_time"],
        status=rec["status"],
        worker_id=wid(rec["worker_id"]),
        last_heartbeat_time=rec["last_heartbeat_time"],
        metadata=_json.decode(rec["metadata"]),
    )


def worker_model(rec: Any) -> Worker:
    stats = rec["heartbeat_stats"]
    return Worker(
        worker_id=wid(rec["worker_key"]),  # type: ignore[arg-type]
        status=rec["status"],
        heartbeat_stats=None if stats is None else _json.decode(stats),
        last_heartbeat_time=rec["last_heartbeat_time"],
        last_dequeue_time=rec["last_dequeue_time"],
        last_busy_time=rec["last_busy_time"],
        last_idle_time=rec["last_idle_time"],
        current_rollout_id=rec["current_rollout_id"],
        current_attempt_id=rec["current_attempt_id"],
    )


def resources_model(rec: Any) -> ResourcesUpdate:
    return ResourcesUpdate(
        resources_id=rec["resources_id"],
        resources=_json.decode(rec["resources"]),
        create_time=rec["create_time"],
        update_time=rec["update_time"],
        version=rec["version"],
    )

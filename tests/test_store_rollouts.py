"""Store specification, part 1: the queue, attempts, status propagation, retries and bad input.

Every test runs against every store implementation (``store`` fixture) and only uses the public
store API, comparing values (never identities), so the HTTP client runs it unchanged.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import BOTH_BACKENDS, make_span

from agl_async import EnqueueRolloutRequest, LightningStore, RolloutConfig

pytestmark = pytest.mark.anyio


@pytest.fixture(params=BOTH_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# ---------------------------------------------------------------------------------- enqueue


async def test_enqueue_rollout_is_queuing_with_no_attempt(store: LightningStore) -> None:
    config = RolloutConfig(max_attempts=3, retry_condition=["failed"])
    r = await store.enqueue_rollout({"q": 1}, mode="train", config=config, metadata={"k": "v"})
    assert r.status == "queuing"
    assert r.input == {"q": 1}
    assert r.mode == "train"
    assert r.config == config
    assert r.metadata == {"k": "v"}
    assert r.end_time is None
    assert r.resources_id is None  # no resources yet
    assert await store.get_rollout_by_id(r.rollout_id) == r
    assert await store.query_attempts(r.rollout_id) == []
    assert await store.get_latest_attempt(r.rollout_id) is None


async def test_enqueue_defaults(store: LightningStore) -> None:
    r = await store.enqueue_rollout("x")
    assert (r.mode, r.metadata, r.config) == (None, {}, RolloutConfig())


async def test_enqueue_binds_the_latest_resources(store: LightningStore) -> None:
    first = await store.add_resources({"model": "a"})
    r1 = await store.enqueue_rollout(1)
    assert r1.resources_id == first.resources_id
    second = await store.add_resources({"model": "b"})
    r2 = await store.enqueue_rollout(2)
    assert r2.resources_id == second.resources_id
    pinned = await store.enqueue_rollout(3, resources_id=first.resources_id)
    assert pinned.resources_id == first.resources_id
    # updating a snapshot makes it the latest again
    await store.update_resources(first.resources_id, {"model": "a2"})
    r4 = await store.enqueue_rollout(4)
    assert r4.resources_id == first.resources_id
    # binding happened at enqueue time: earlier rollouts keep theirs
    got = await store.get_rollout_by_id(r2.rollout_id)
    assert got is not None and got.resources_id == second.resources_id


async def test_enqueue_unknown_resources_raises_and_changes_nothing(store: LightningStore) -> None:
    with pytest.raises(ValueError, match="rs-missing"):
        await store.enqueue_rollout(1, resources_id="rs-missing")
    with pytest.raises(ValueError, match="rs-missing"):
        await store.start_rollout(1, resources_id="rs-missing")
    assert await store.query_rollouts() == []
    assert await store.dequeue_rollout() is None


async def test_enqueue_unknown_mode_raises(store: LightningStore) -> None:
    with pytest.raises(ValueError, match="bogus"):
        await store.enqueue_rollout(1, mode="bogus")  # type: ignore[arg-type]
    assert await store.query_rollouts() == []


async def test_enqueue_many_and_dequeue_many_keep_order(store: LightningStore) -> None:
    created = await store.enqueue_many_rollouts(
        [
            EnqueueRolloutRequest(input=0, mode="val"),
            {"input": 1, "metadata": {"i": 1}},
            EnqueueRolloutRequest(input=2, config=RolloutConfig(max_attempts=2)),
        ]
    )
    assert [r.input for r in created] == [0, 1, 2]
    assert [r.status for r in created] == ["queuing"] * 3
    assert created[0].mode == "val"
    assert created[1].metadata == {"i": 1}
    assert created[2].config.max_attempts == 2
    assert len({r.rollout_id for r in created}) == 3

    first_two = await store.dequeue_many_rollouts(limit=2, worker_id="w")
    assert [r.rollout_id for r in first_two] == [r.rollout_id for r in created[:2]]
    assert all(r.status == "preparing" and r.attempt.worker_id == "w" for r in first_two)
    rest = await store.dequeue_many_rollouts(limit=10)
    assert [r.rollout_id for r in rest] == [created[2].rollout_id]
    assert await store.dequeue_many_rollouts(limit=10) == []


async def test_enqueue_many_validates_every_entry_first(store: LightningStore) -> None:
    with pytest.raises(ValueError, match="rs-missing"):
        await store.enqueue_many_rollouts(
            [EnqueueRolloutRequest(input=0), EnqueueRolloutRequest(input=1, resources_id="rs-missing")]
        )
    assert await store.query_rollouts() == []
    assert (await store.statistics())["queue_length"] == 0


# ---------------------------------------------------------------------------------- dequeue


async def test_dequeue_is_fifo_and_none_when_empty(store: LightningStore) -> None:
    assert await store.dequeue_rollout() is None
    ids = [(await store.enqueue_rollout(i)).rollout_id for i in range(5)]
    got = [await store.dequeue_rollout() for _ in range(5)]
    assert [r.rollout_id for r in got if r is not None] == ids
    assert await store.dequeue_rollout() is None


async def test_dequeue_makes_a_preparing_attempt_with_the_worker(store: LightningStore) -> None:
    r = await store.enqueue_rollout({"x": 1}, metadata={"m": 1})
    claimed = await store.dequeue_rollout(worker_id="runner-7")
    assert claimed is not None
    assert claimed.rollout_id == r.rollout_id
    assert claimed.input == {"x": 1} and claimed.metadata == {"m": 1}
    assert claimed.status == "preparing"
    attempt = claimed.attempt
    assert attempt.rollout_id == r.rollout_id
    assert attempt.sequence_id == 1
    assert attempt.status == "preparing"
    assert attempt.worker_id == "runner-7"
    assert attempt.end_time is None
    assert await store.query_attempts(r.rollout_id) == [attempt]
    assert await store.get_latest_attempt(r.rollout_id) == attempt
    got = await store.get_rollout_by_id(r.rollout_id)
    assert got is not None and got.status == "preparing"


async def test_integer_worker_ids_are_kept(store: LightningStore) -> None:
    await store.enqueue_rollout(1)
    claimed = await store.dequeue_rollout(worker_id=0)
    assert claimed is not None and claimed.attempt.worker_id == 0
    worker = await store.get_worker_by_id(0)
    assert worker is not None and worker.worker_id == 0


async def test_start_rollout_creates_and_claims(store: LightningStore) -> None:
    queued = await store.enqueue_rollout("queued")
    started = await store.start_rollout("direct", mode="test", metadata={"a": 1}, worker_id="w")
    assert started.status == "preparing"
    assert started.input == "direct" and started.mode == "test" and started.metadata == {"a": 1}
    assert started.attempt.sequence_id == 1
    assert started.attempt.worker_id == "w"
    assert await store.get_latest_attempt(started.rollout_id) == started.attempt
    # it never visits the queue
    claimed = await store.dequeue_rollout()
    assert claimed is not None and claimed.rollout_id == queued.rollout_id
    assert await store.dequeue_rollout() is None


async def test_start_attempt_numbers_attempts(store: LightningStore) -> None:
    started = await store.start_rollout(1)
    second = await store.start_attempt(started.rollout_id, worker_id="w2")
    assert second.rollout_id == started.rollout_id
    assert second.attempt.sequence_id == 2
    assert second.attempt.worker_id == "w2"
    assert second.attempt.attempt_id != started.attempt.attempt_id
    attempts = await store.query_attempts(started.rollout_id)
    assert [a.sequence_id for a in attempts] == [1, 2]
    latest = await store.get_latest_attempt(started.rollout_id)
    assert latest is not None and latest.attempt_id == second.attempt.attempt_id


async def test_start_attempt_on_a_queued_rollout_takes_it_out_of_the_queue(store: LightningStore) -> None:
    a = await store.enqueue_rollout("a")
    b = await store.enqueue_rollout("b")
    manual = await store.start_attempt(a.rollout_id)
    assert manual.status == "preparing"
    assert (await store.statistics())["queue_length"] == 1
    claimed = await store.dequeue_rollout()
    assert claimed is not None and claimed.rollout_id == b.rollout_id
    assert await store.dequeue_rollout() is None


# ---------------------------------------------------------------------------------- updates and propagation


async def test_update_attempt_latest_drives_the_rollout(store: LightningStore) -> None:
    await store.enqueue_rollout(1)
    claimed = await store.dequeue_rollout(worker_id="w")
    assert claimed is not None
    rid = claimed.rollout_id
    running = await store.update_attempt(rid, "latest", status="running")
    assert running.status == "running" and running.attempt_id == claimed.attempt.attempt_id
    got = await store.get_rollout_by_id(rid)
    assert got is not None and got.status == "running"

    done = await store.update_attempt(rid, claimed.attempt.attempt_id, status="succeeded")
    assert done.status == "succeeded"
    assert done.end_time is not None and done.end_time >= done.start_time
    got = await store.get_rollout_by_id(rid)
    assert got is not None and got.status == "succeeded"
    assert got.end_time is not None


async def test_update_attempt_metadata_and_worker(store: LightningStore) -> None:
    started = await store.start_rollout(1)
    updated = await store.update_attempt(started.rollout_id, "latest", worker_id="w9", metadata={"k": 2})
    assert updated.worker_id == "w9" and updated.metadata == {"k": 2}
    assert updated.status == "preparing"
    assert await store.get_latest_attempt(started.rollout_id) == updated
    worker = await store.get_worker_by_id("w9")
    assert worker is not None and worker.status == "busy"


async def test_update_attempt_counts_as_heartbeat(store: LightningStore) -> None:
    started = await store.start_rollout(1)
    assert started.attempt.last_heartbeat_time is None
    beat = await store.update_attempt(started.rollout_id, "latest")
    assert beat.last_heartbeat_time is not None and beat.last_heartbeat_time >= started.attempt.start_time


async def test_only_the_latest_attempt_drives_the_rollout(store: LightningStore) -> None:
    first = await store.start_rollout(1)
    second = await store.start_attempt(first.rollout_id)
    await store.update_attempt(first.rollout_id, first.attempt.attempt_id, status="failed")
    got = await store.get_rollout_by_id(first.rollout_id)
    assert got is not None and got.status == "preparing"
    await store.update_attempt(first.rollout_id, second.attempt.attempt_id, status="succeeded")
    got = await store.get_rollout_by_id(first.rollout_id)
    assert got is not None and got.status == "succeeded"


async def test_failed_attempt_without_retry_fails_the_rollout(store: LightningStore) -> None:
    started = await store.start_rollout(1)
    await store.update_attempt(started.rollout_id, "latest", status="failed")
    got = await store.get_rollout_by_id(started.rollout_id)
    assert got is not None and got.status == "failed" and got.end_time is not None
    assert await store.dequeue_rollout() is None


async def test_retry_requeues_then_a_new_attempt_then_fails_when_exhausted(store: LightningStore) -> None:
    config = RolloutConfig(max_attempts=2, retry_condition=["failed"])
    r = await store.enqueue_rollout("task", config=config)
    first = await store.dequeue_rollout(worker_id="w1")
    assert first is not None
    await store.update_attempt(r.rollout_id, "latest", status="failed")
    got = await store.get_rollout_by_id(r.rollout_id)
    assert got is not None and got.status == "requeuing" and got.end_time is None
    assert [x.rollout_id for x in await store.query_rollouts(status_in=["requeuing"])] == [r.rollout_id]

    second = await store.dequeue_rollout(worker_id="w2")
    assert second is not None and second.rollout_id == r.rollout_id
    assert second.status == "preparing"
    assert second.attempt.sequence_id == 2 and second.attempt.worker_id == "w2"
    await store.update_attempt(r.rollout_id, "latest", status="failed")
    got = await store.get_rollout_by_id(r.rollout_id)
    assert got is not None and got.status == "failed"
    assert await store.dequeue_rollout() is None
    assert [a.status for a in await store.query_attempts(r.rollout_id)] == ["failed", "failed"]


async def test_retry_then_success(store: LightningStore) -> None:
    config = RolloutConfig(max_attempts=3, retry_condition=["failed", "timeout"])
    r = await store.enqueue_rollout("task", config=config)
    for _ in range(2):
        assert await store.dequeue_rollout() is not None
        await store.update_attempt(r.rollout_id, "latest", status="failed")
    third = await store.dequeue_rollout()
    assert third is not None and third.attempt.sequence_id == 3
    await store.update_attempt(r.rollout_id, "latest", status="succeeded")
    got = await store.get_rollout_by_id(r.rollout_id)
    assert got is not None and got.status == "succeeded"


async def test_status_not_in_retry_condition_fails_at_once(store: LightningStore) -> None:
    config = RolloutConfig(max_attempts=5, retry_condition=["unresponsive"])
    r = await store.enqueue_rollout("task", config=config)
    await store.dequeue_rollout()
    await store.update_attempt(r.rollout_id, "latest", status="failed")
    got = await store.get_rollout_by_id(r.rollout_id)
    assert got is not None and got.status == "failed"


async def test_requeued_rollout_goes_to_the_tail(store: LightningStore) -> None:
    config = RolloutConfig(max_attempts=2, retry_condition=["failed"])
    a = await store.enqueue_rollout("a", config=config)
    b = await store.enqueue_rollout("b")
    claimed = await store.dequeue_rollout()
    assert claimed is not None and claimed.rollout_id == a.rollout_id
    await store.update_attempt(a.rollout_id, "latest", status="failed")
    order = [await store.dequeue_rollout(), await store.dequeue_rollout()]
    assert [r.rollout_id for r in order if r is not None] == [b.rollout_id, a.rollout_id]


async def test_update_rollout_fields(store: LightningStore) -> None:
    res = await store.add_resources({"m": 1})
    r = await store.enqueue_rollout(1)
    new_config = RolloutConfig(max_attempts=4)
    updated = await store.update_rollout(
        r.rollout_id, input=2, mode="val", metadata={"z": 1}, config=new_config, resources_id=None
    )
    assert (updated.input, updated.mode, updated.metadata, updated.config) == (2, "val", {"z": 1}, new_config)
    assert updated.resources_id is None
    assert updated.status == "queuing"  # untouched fields stay
    again = await store.update_rollout(r.rollout_id, resources_id=res.resources_id)
    assert again.resources_id == res.resources_id and again.input == 2
    assert await store.get_rollout_by_id(r.rollout_id) == again


async def test_update_rollout_terminal_status_leaves_the_queue(store: LightningStore) -> None:
    a = await store.enqueue_rollout("a")
    b = await store.enqueue_rollout("b")
    cancelled = await store.update_rollout(a.rollout_id, status="cancelled")
    assert cancelled.status == "cancelled" and cancelled.end_time is not None
    assert (await store.statistics())["queue_length"] == 1
    claimed = await store.dequeue_rollout()
    assert claimed is not None and claimed.rollout_id == b.rollout_id
    assert await store.dequeue_rollout() is None


async def test_update_rollout_queue_status_requeues_exactly_once_at_the_tail(store: LightningStore) -> None:
    a = await store.enqueue_rollout("a")
    b = await store.enqueue_rollout("b")
    await store.update_rollout(a.rollout_id, status="cancelled")
    requeued = await store.update_rollout(a.rollout_id, status="queuing")
    assert requeued.status == "queuing" and requeued.end_time is None
    await store.update_rollout(a.rollout_id, status="requeuing")  # already queued: not twice
    assert (await store.statistics())["queue_length"] == 2
    order = [await store.dequeue_rollout() for _ in range(3)]
    assert [r.rollout_id if r else None for r in order] == [b.rollout_id, a.rollout_id, None]


async def test_a_cancelled_rollout_ignores_its_attempts(store: LightningStore) -> None:
    started = await store.start_rollout(1)
    await store.update_rollout(started.rollout_id, status="cancelled")
    await store.update_attempt(started.rollout_id, "latest", status="succeeded")
    got = await store.get_rollout_by_id(started.rollout_id)
    assert got is not None and got.status == "cancelled"


async def test_late_result_of_a_requeued_attempt_takes_it_out_of_the_queue(store: LightningStore) -> None:
    config = RolloutConfig(max_attempts=2, retry_condition=["failed"])
    r = await store.enqueue_rollout("task", config=config)
    await store.dequeue_rollout()
    await store.update_attempt(r.rollout_id, "latest", status="failed")  # requeuing
    await store.update_attempt(r.rollout_id, "latest", status="succeeded")  # the result arrives anyway
    got = await store.get_rollout_by_id(r.rollout_id)
    assert got is not None and got.status == "succeeded"
    assert await store.dequeue_rollout() is None
    assert (await store.statistics())["queue_length"] == 0


async def test_query_rollouts_filters(store: LightningStore) -> None:
    a = await store.enqueue_rollout("a")
    b = await store.start_rollout("b")
    c = await store.enqueue_rollout("c")
    assert [r.rollout_id for r in await store.query_rollouts()] == [a.rollout_id, b.rollout_id, c.rollout_id]
    queuing = await store.query_rollouts(status_in=["queuing"])
    assert [r.rollout_id for r in queuing] == [a.rollout_id, c.rollout_id]
    by_id = await store.query_rollouts(rollout_id_in=[c.rollout_id, "ro-missing"])
    assert [r.rollout_id for r in by_id] == [c.rollout_id]
    both = await store.query_rollouts(status_in=["preparing"], rollout_id_in=[a.rollout_id, b.rollout_id])
    assert [r.rollout_id for r in both] == [b.rollout_id]


# ---------------------------------------------------------------------------------- unknown ids


async def test_getters_return_none_for_unknown_ids(store: LightningStore) -> None:
    assert await store.get_rollout_by_id("ro-missing") is None
    assert await store.get_latest_attempt("ro-missing") is None
    assert await store.get_resources_by_id("rs-missing") is None
    assert await store.get_worker_by_id("w-missing") is None
    assert await store.query_attempts("ro-missing") == []
    assert await store.query_spans("ro-missing") == []


async def test_mutations_raise_value_error_naming_the_id(store: LightningStore) -> None:
    started = await store.start_rollout(1)
    rid, aid = started.rollout_id, started.attempt.attempt_id
    queued = await store.enqueue_rollout(2)
    with pytest.raises(ValueError, match="ro-missing"):
        await store.update_rollout("ro-missing", status="failed")
    with pytest.raises(ValueError, match="ro-missing"):
        await store.update_attempt("ro-missing", "latest", status="failed")
    with pytest.raises(ValueError, match="at-missing"):
        await store.update_attempt(rid, "at-missing", status="failed")
    with pytest.raises(ValueError, match=queued.rollout_id):  # no attempt yet: no "latest"
        await store.update_attempt(queued.rollout_id, "latest", status="failed")
    with pytest.raises(ValueError, match=aid):  # an attempt of another rollout
        await store.update_attempt(queued.rollout_id, aid, status="failed")
    with pytest.raises(ValueError, match="ro-missing"):
        await store.start_attempt("ro-missing")
    with pytest.raises(ValueError, match="ro-missing"):
        await store.add_span(make_span("ro-missing", aid))
    with pytest.raises(ValueError, match="at-missing"):
        await store.add_span(make_span(rid, "at-missing"))
    with pytest.raises(ValueError, match="at-missing"):
        await store.get_next_span_sequence_id(rid, "at-missing")
    with pytest.raises(ValueError, match="rs-missing"):
        await store.update_resources("rs-missing", {"a": 1})
    # nothing changed
    assert await store.query_attempts(rid) == [started.attempt]
    assert await store.query_attempts(queued.rollout_id) == []
    assert await store.query_spans(rid) == []
    assert await store.query_resources() == []


# ---------------------------------------------------------------------------------- invalid values


async def test_unknown_attempt_status_raises_and_changes_nothing(store: LightningStore) -> None:
    started = await store.start_rollout(1)
    with pytest.raises(ValueError, match="bogus"):
        await store.update_attempt(
            started.rollout_id,
            "latest",
            status="bogus",  # type: ignore[arg-type]
            metadata={"changed": True},
        )
    assert await store.get_latest_attempt(started.rollout_id) == started.attempt
    got = await store.get_rollout_by_id(started.rollout_id)
    assert got is not None and got.status == "preparing" and got.metadata == {}


async def test_unknown_rollout_status_raises_and_changes_nothing(store: LightningStore) -> None:
    r = await store.enqueue_rollout(1)
    with pytest.raises(ValueError, match="bogus"):
        await store.update_rollout(r.rollout_id, status="bogus", input=2, metadata={"x": 1})  # type: ignore[arg-type]
    assert await store.get_rollout_by_id(r.rollout_id) == r


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": -1},
        {"timeout_seconds": 0},
        {"unresponsive_seconds": -2.0},
        {"retry_condition": ["bogus"]},
    ],
)
def test_invalid_config_is_refused_at_construction(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RolloutConfig(**kwargs)


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_attempts", 0), ("retry_condition", ["bogus"]), ("timeout_seconds", -1.0)],
)
async def test_invalid_config_raises_and_changes_nothing(
    store: LightningStore, field: str, value: Any
) -> None:
    bad = RolloutConfig()
    setattr(bad, field, value)  # models do not validate on assignment: the store must check
    with pytest.raises(ValueError, match=field):
        await store.enqueue_rollout(1, config=bad)
    with pytest.raises(ValueError, match=field):
        await store.start_rollout(1, config=bad)
    assert await store.query_rollouts() == []
    r = await store.enqueue_rollout(1)
    with pytest.raises(ValueError, match=field):
        await store.update_rollout(r.rollout_id, config=bad, input=2)
    assert await store.get_rollout_by_id(r.rollout_id) == r


async def test_config_with_a_non_list_retry_condition_is_refused(store: LightningStore) -> None:
    bad = RolloutConfig()
    bad.retry_condition = None  # type: ignore[assignment]
    with pytest.raises(ValueError, match="retry_condition"):
        await store.enqueue_rollout(1, config=bad)
    assert await store.query_rollouts() == []

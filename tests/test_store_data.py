"""Store specification, part 3: spans, resources, workers and statistics."""

from __future__ import annotations

import pytest
from conftest import BOTH_BACKENDS, make_span

from agl_async import LightningStore
from agl_async.types import AUTO_SEQUENCE_ID

pytestmark = pytest.mark.anyio


@pytest.fixture(params=BOTH_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# ---------------------------------------------------------------------------------- spans


async def test_span_sequence_ids_are_per_attempt(store: LightningStore) -> None:
    first = await store.start_rollout(1)
    second = await store.start_attempt(first.rollout_id)
    rid, a1, a2 = first.rollout_id, first.attempt.attempt_id, second.attempt.attempt_id
    assert [await store.get_next_span_sequence_id(rid, a1) for _ in range(3)] == [1, 2, 3]
    assert await store.get_next_span_sequence_id(rid, a2) == 1
    assert await store.get_next_span_sequence_id(rid, a1) == 4
    other = await store.start_rollout(2)
    assert await store.get_next_span_sequence_id(other.rollout_id, other.attempt.attempt_id) == 1


async def test_added_spans_advance_the_sequence(store: LightningStore) -> None:
    started = await store.start_rollout(1)
    rid, aid = started.rollout_id, started.attempt.attempt_id
    await store.add_span(make_span(rid, aid, 7))
    assert await store.get_next_span_sequence_id(rid, aid) == 8  # never issues one already used


async def test_spans_added_with_sequence_id_zero_are_numbered_by_the_store(store: LightningStore) -> None:
    # AUTO_SEQUENCE_ID: how OTLP ingestion and the runner's tracer write spans in one call.
    started = await store.start_rollout(1)
    rid, aid = started.rollout_id, started.attempt.attempt_id
    assert AUTO_SEQUENCE_ID == 0
    assert await store.get_next_span_sequence_id(rid, aid) == 1
    added = await store.add_many_spans(
        [
            make_span(rid, aid, 0, span_id="a"),
            make_span(rid, aid, 5, span_id="b"),
            make_span(rid, aid, 0, span_id="c"),
        ]
    )
    assert [(s.span_id, s.sequence_id) for s in added] == [("a", 2), ("b", 5), ("c", 6)]
    single = await store.add_span(make_span(rid, aid, 0, span_id="d"))
    assert single is not None and single.sequence_id == 7
    assert [(s.span_id, s.sequence_id) for s in await store.query_spans(rid)] == [
        ("a", 2),
        ("b", 5),
        ("c", 6),
        ("d", 7),
    ]
    assert await store.get_next_span_sequence_id(rid, aid) == 8  # never issues one already used


async def test_query_spans_by_attempt_and_latest(store: LightningStore) -> None:
    first = await store.start_rollout(1)
    rid, a1 = first.rollout_id, first.attempt.attempt_id
    stored = await store.add_span(make_span(rid, a1, 2))
    assert stored == make_span(rid, a1, 2)
    await store.add_span(make_span(rid, a1, 1))
    second = await store.start_attempt(rid)
    a2 = second.attempt.attempt_id
    await store.add_many_spans([make_span(rid, a2, 1), make_span(rid, a2, 2)])

    everything = await store.query_spans(rid)
    assert [(s.attempt_id, s.sequence_id) for s in everything] == [(a1, 1), (a1, 2), (a2, 1), (a2, 2)]
    assert everything[0] == make_span(rid, a1, 1)  # attributes round-trip as values
    assert [s.sequence_id for s in await store.query_spans(rid, attempt_id=a1)] == [1, 2]
    latest = await store.query_spans(rid, attempt_id="latest")
    assert [(s.attempt_id, s.sequence_id) for s in latest] == [(a2, 1), (a2, 2)]
    assert await store.query_spans(rid, attempt_id="at-missing") == []
    assert (await store.statistics())["total_spans"] == 4


async def test_a_span_is_a_heartbeat_that_makes_the_attempt_running(store: LightningStore) -> None:
    started = await store.start_rollout(1)
    rid, aid = started.rollout_id, started.attempt.attempt_id
    await store.add_span(make_span(rid, aid, 1))
    attempt = await store.get_latest_attempt(rid)
    assert attempt is not None and attempt.status == "running"
    assert attempt.last_heartbeat_time is not None
    rollout = await store.get_rollout_by_id(rid)
    assert rollout is not None and rollout.status == "running"


async def test_spans_after_the_end_do_not_revive_a_finished_attempt(store: LightningStore) -> None:
    started = await store.start_rollout(1)
    rid, aid = started.rollout_id, started.attempt.attempt_id
    await store.update_attempt(rid, aid, status="succeeded")
    await store.add_span(make_span(rid, aid, 1))
    attempt = await store.get_latest_attempt(rid)
    assert attempt is not None and attempt.status == "succeeded"
    assert len(await store.query_spans(rid)) == 1


async def test_add_many_spans_is_all_or_nothing(store: LightningStore) -> None:
    started = await store.start_rollout(1)
    rid, aid = started.rollout_id, started.attempt.attempt_id
    with pytest.raises(ValueError, match="at-missing"):
        await store.add_many_spans([make_span(rid, aid, 1), make_span(rid, "at-missing", 2)])
    assert await store.query_spans(rid) == []
    attempt = await store.get_latest_attempt(rid)
    assert attempt is not None and attempt.status == "preparing"


# ---------------------------------------------------------------------------------- resources


async def test_resources_add_update_latest_and_query(store: LightningStore) -> None:
    assert await store.get_latest_resources() is None
    assert await store.query_resources() == []
    first = await store.add_resources({"model": {"endpoint": "http://x", "n": 1}})
    assert first.version == 1
    assert first.resources == {"model": {"endpoint": "http://x", "n": 1}}
    assert await store.get_latest_resources() == first
    assert await store.get_resources_by_id(first.resources_id) == first

    second = await store.add_resources({"prompt": "hi"})
    assert second.resources_id != first.resources_id
    assert await store.get_latest_resources() == second

    updated = await store.update_resources(first.resources_id, {"model": {"n": 2}})
    assert updated.resources_id == first.resources_id
    assert updated.version == 2
    assert updated.resources == {"model": {"n": 2}}
    assert updated.update_time >= first.update_time
    assert updated.create_time == first.create_time
    assert await store.get_latest_resources() == updated
    assert await store.get_resources_by_id(first.resources_id) == updated
    queried = await store.query_resources()
    assert [r.resources_id for r in queried] == [first.resources_id, second.resources_id]


async def test_resources_must_be_a_mapping(store: LightningStore) -> None:
    with pytest.raises(ValueError, match="mapping"):
        await store.add_resources(["not", "a", "mapping"])  # type: ignore[arg-type]
    assert await store.query_resources() == []


# ---------------------------------------------------------------------------------- workers


async def test_worker_busy_while_it_holds_an_attempt_idle_after(store: LightningStore) -> None:
    a = await store.enqueue_rollout("a")
    claimed = await store.dequeue_rollout(worker_id="w")
    assert claimed is not None
    worker = await store.get_worker_by_id("w")
    assert worker is not None
    assert worker.status == "busy"
    assert worker.current_rollout_id == a.rollout_id
    assert worker.current_attempt_id == claimed.attempt.attempt_id
    assert worker.last_dequeue_time is not None and worker.last_busy_time is not None
    assert [w.worker_id for w in await store.query_workers(status_in=["busy"])] == ["w"]

    await store.update_attempt(a.rollout_id, "latest", status="succeeded")
    worker = await store.get_worker_by_id("w")
    assert worker is not None
    assert worker.status == "idle"
    assert worker.current_rollout_id is None and worker.current_attempt_id is None
    assert worker.last_idle_time is not None
    assert await store.query_workers(status_in=["busy"]) == []


async def test_failed_attempt_frees_the_worker(store: LightningStore) -> None:
    await store.start_rollout(1, worker_id=3)
    rollout = (await store.query_rollouts())[0]
    await store.update_attempt(rollout.rollout_id, "latest", status="failed")
    worker = await store.get_worker_by_id(3)
    assert worker is not None and worker.status == "idle"


async def test_empty_dequeue_registers_an_idle_worker(store: LightningStore) -> None:
    assert await store.dequeue_rollout(worker_id="lonely") is None
    worker = await store.get_worker_by_id("lonely")
    assert worker is not None and worker.status == "idle" and worker.last_dequeue_time is not None


async def test_update_worker_records_a_heartbeat(store: LightningStore) -> None:
    fresh = await store.update_worker("w", heartbeat_stats={"gpu": 0.5})
    assert fresh.worker_id == "w"
    assert fresh.heartbeat_stats == {"gpu": 0.5}
    assert fresh.last_heartbeat_time is not None
    again = await store.update_worker("w")
    assert again.heartbeat_stats == {"gpu": 0.5}  # omitted: kept
    assert again.last_heartbeat_time is not None and again.last_heartbeat_time >= fresh.last_heartbeat_time
    assert await store.get_worker_by_id("w") == again
    assert [w.worker_id for w in await store.query_workers()] == ["w"]


async def test_worker_heartbeat_is_a_heartbeat_of_its_attempt(store: LightningStore) -> None:
    started = await store.start_rollout(1, worker_id="w")
    assert started.attempt.last_heartbeat_time is None
    await store.update_worker("w")
    attempt = await store.get_latest_attempt(started.rollout_id)
    assert attempt is not None and attempt.last_heartbeat_time is not None


# ---------------------------------------------------------------------------------- statistics


async def test_statistics_count_by_status(store: LightningStore) -> None:
    await store.add_resources({"m": 1})
    await store.enqueue_many_rollouts([{"input": i} for i in range(3)])
    done = await store.start_rollout("done", worker_id="a")
    await store.update_attempt(done.rollout_id, "latest", status="succeeded")
    await store.dequeue_rollout(worker_id="b")
    await store.add_span(make_span(done.rollout_id, done.attempt.attempt_id, 1))

    stats = await store.statistics()
    assert stats["total_rollouts"] == 4
    assert stats["total_attempts"] == 2
    assert stats["total_spans"] == 1
    assert stats["total_resources"] == 1
    assert stats["queue_length"] == 2
    assert stats["rollouts"]["queuing"] == 2
    assert stats["rollouts"]["preparing"] == 1
    assert stats["rollouts"]["succeeded"] == 1
    assert stats["rollouts"]["failed"] == 0
    assert stats["attempts"]["succeeded"] == 1
    assert stats["attempts"]["preparing"] == 1
    assert stats["workers"] == {"busy": 1, "idle": 1, "unknown": 0}


# ---------------------------------------------------------------------------------- snapshots


async def test_returned_objects_are_snapshots(store: LightningStore) -> None:
    res = await store.add_resources({"model": "m"})
    started = await store.start_rollout({"q": 1}, metadata={"k": 1}, worker_id="w")
    rid, aid = started.rollout_id, started.attempt.attempt_id
    span = make_span(rid, aid, 1)
    await store.add_span(span)
    await store.update_worker("w", heartbeat_stats={"load": 1})

    # mutate everything the caller was handed; the store must not see any of it
    started.metadata["k"] = 2
    started.config.max_attempts = 0
    started.attempt.metadata["x"] = 1
    for rollout in await store.query_rollouts():
        rollout.metadata["k"] = 3
        rollout.config.retry_condition.append("failed")
        rollout.status = "succeeded"
    for attempt in await store.query_attempts(rid):
        attempt.metadata["y"] = 1
        attempt.status = "failed"
    for stored in await store.query_spans(rid):
        stored.attributes.clear()
    for resources in await store.query_resources():
        resources.resources["model"] = "other"
    for worker in await store.query_workers():
        assert worker.heartbeat_stats is not None
        worker.heartbeat_stats["load"] = 2

    rollout = await store.get_rollout_by_id(rid)
    assert rollout is not None
    assert rollout.metadata == {"k": 1} and rollout.config.max_attempts == 1
    assert rollout.config.retry_condition == [] and rollout.status == "running"
    attempt = await store.get_latest_attempt(rid)
    assert attempt is not None and attempt.metadata == {} and attempt.status == "running"
    assert await store.query_spans(rid) == [make_span(rid, aid, 1)]
    assert await store.get_resources_by_id(res.resources_id) == res
    worker = await store.get_worker_by_id("w")
    assert worker is not None and worker.heartbeat_stats == {"load": 1}


async def test_span_sequence_id_must_be_an_integer(store: LightningStore) -> None:
    started = await store.start_rollout(1)
    bad = make_span(started.rollout_id, started.attempt.attempt_id, 1)
    bad.sequence_id = "one"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="sequence_id"):
        await store.add_span(bad)
    good = make_span(started.rollout_id, started.attempt.attempt_id, 1)
    with pytest.raises(ValueError, match="sequence_id"):
        await store.add_many_spans([good, bad])
    assert await store.query_spans(started.rollout_id) == []


async def test_a_span_with_attributes_that_are_not_json_values_is_refused(store: LightningStore) -> None:
    started = await store.start_rollout(1)
    good = make_span(started.rollout_id, started.attempt.attempt_id, 1)
    bad = make_span(started.rollout_id, started.attempt.attempt_id, 2, attributes={"handle": object()})
    with pytest.raises(ValueError):
        await store.add_span(bad)
    with pytest.raises(ValueError):
        await store.add_many_spans([good, bad])
    assert await store.query_spans(started.rollout_id) == []


async def test_the_store_keeps_a_snapshot_of_an_added_span(store: LightningStore) -> None:
    started = await store.start_rollout(1)
    span = make_span(started.rollout_id, started.attempt.attempt_id, 1, attributes={"step": [1]})
    await store.add_span(span)
    span.attributes["step"].append(2)  # the caller's object, changed after the call
    span.name = "renamed"
    [stored] = await store.query_spans(started.rollout_id)
    assert (stored.name, stored.attributes) == ("step", {"step": [1]})
    stored.attributes["step"].append(3)  # a query's answer is the caller's too
    [again] = await store.query_spans(started.rollout_id)
    assert again.attributes == {"step": [1]}

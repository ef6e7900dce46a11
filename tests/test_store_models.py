"""The data model's JSON round-trip, and pickling of the in-memory store (a copy of its state)."""

from __future__ import annotations

import pickle
from typing import Any

import anyio
import msgspec
import pytest
from conftest import BOTH_BACKENDS
from hypothesis import given, settings
from hypothesis import strategies as st

from agl_async import (
    UNSET,
    Attempt,
    AttemptedRollout,
    EnqueueRolloutRequest,
    InMemoryLightningStore,
    LightningStoreLocked,
    ResourcesUpdate,
    Rollout,
    RolloutConfig,
    Span,
    Worker,
)
from agl_async.types import (
    ATTEMPT_STATUSES,
    ROLLOUT_STATUSES,
    TERMINAL_ROLLOUT_STATUSES,
    from_json,
    to_builtins,
    to_json,
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3),
    max_leaves=10,
)
json_dicts = st.dictionaries(st.text(), json_values, max_size=4)

configs = st.builds(
    RolloutConfig,
    timeout_seconds=st.none() | st.floats(min_value=0.001, max_value=1e6),
    unresponsive_seconds=st.none() | st.floats(min_value=0.001, max_value=1e6),
    max_attempts=st.integers(1, 10),
    retry_condition=st.lists(st.sampled_from(["failed", "timeout", "unresponsive"]), unique=True),
)
attempts = st.builds(
    Attempt,
    rollout_id=st.text(min_size=1),
    attempt_id=st.text(min_size=1),
    sequence_id=st.integers(1, 100),
    start_time=st.floats(0, 2e9),
    end_time=st.none() | st.floats(0, 2e9),
    status=st.sampled_from(sorted(ATTEMPT_STATUSES)),
    worker_id=st.none() | st.text() | st.integers(0, 1000),
    last_heartbeat_time=st.none() | st.floats(0, 2e9),
    metadata=json_dicts,
)
rollout_fields: dict[str, Any] = dict(
    rollout_id=st.text(min_size=1),
    input=json_values,
    start_time=st.floats(0, 2e9),
    end_time=st.none() | st.floats(0, 2e9),
    mode=st.sampled_from([None, "train", "val", "test"]),
    resources_id=st.none() | st.text(),
    status=st.sampled_from(sorted(ROLLOUT_STATUSES)),
    config=configs,
    metadata=json_dicts,
)
rollouts = st.builds(Rollout, **rollout_fields)
attempted_rollouts = st.builds(AttemptedRollout, attempt=attempts, **rollout_fields)
spans = st.builds(
    Span,
    rollout_id=st.text(),
    attempt_id=st.text(),
    sequence_id=st.integers(0, 10**6),
    trace_id=st.text(),
    span_id=st.text(),
    name=st.text(),
    parent_id=st.none() | st.text(),
    start_time=st.none() | st.floats(0, 2e9),
    end_time=st.none() | st.floats(0, 2e9),
    attributes=json_dicts,
    events=st.lists(json_dicts, max_size=2),
    status_code=st.sampled_from(["unset", "ok", "error"]),
    status_message=st.none() | st.text(),
)
resources = st.builds(
    ResourcesUpdate,
    resources_id=st.text(),
    resources=json_dicts,
    create_time=st.floats(0, 2e9),
    update_time=st.floats(0, 2e9),
    version=st.integers(1, 100),
)
workers = st.builds(
    Worker,
    worker_id=st.text() | st.integers(0, 1000),
    status=st.sampled_from(["idle", "busy", "unknown"]),
    heartbeat_stats=st.none() | json_dicts,
    last_heartbeat_time=st.none() | st.floats(0, 2e9),
    current_rollout_id=st.none() | st.text(),
    current_attempt_id=st.none() | st.text(),
)
requests = st.builds(
    EnqueueRolloutRequest,
    input=json_values,
    mode=st.sampled_from([None, "train", "val", "test"]),
    resources_id=st.none() | st.text(),
    config=st.none() | configs,
    metadata=st.none() | json_dicts,
)


@pytest.mark.parametrize(
    "strategy",
    [configs, attempts, rollouts, attempted_rollouts, spans, resources, workers, requests],
    ids=lambda s: repr(s)[:40],
)
def test_every_model_round_trips_through_json(strategy: st.SearchStrategy[Any]) -> None:
    @settings(deadline=None)  # a shared, loaded machine: no per-example time limit
    @given(strategy)
    def check(model: Any) -> None:
        assert from_json(to_json(model), type(model)) == model
        assert from_json(msgspec.json.encode(to_builtins(model)), type(model)) == model

    check()


def test_round_trip_of_a_list_of_models() -> None:
    items = [
        Span(rollout_id="r", attempt_id="a", sequence_id=i, trace_id="t", span_id=str(i), name="n")
        for i in range(3)
    ]
    assert from_json(to_json(items), list[Span]) == items


def test_defaults_are_omitted_and_restored() -> None:
    rollout = Rollout(rollout_id="r", input=None, start_time=1.0)
    encoded = to_builtins(rollout)
    assert {"status", "end_time", "mode", "resources_id", "metadata"}.isdisjoint(encoded)
    assert from_json(to_json(rollout), Rollout) == rollout


@pytest.mark.parametrize(
    ("data", "model", "fragment"),
    [
        (b'{"rollout_id": "r", "input": 1, "status": "bogus"}', Rollout, "status"),
        (b'{"rollout_id": "r"}', Rollout, "input"),
        (b'{"max_attempts": 0}', RolloutConfig, "max_attempts"),
        (b'{"retry_condition": ["bogus"]}', RolloutConfig, "bogus"),
        (b'{"timeout_seconds": "soon"}', RolloutConfig, "timeout_seconds"),
        (b'{"rollout_id": "r", "attempt_id": "a", "sequence_id": "one"}', Attempt, "sequence_id"),
        (b"{not json", Span, "malformed"),
        (b'{"resources_id": "x"}', ResourcesUpdate, "resources"),
    ],
)
def test_from_json_rejects_bad_input_with_value_error(data: bytes, model: type, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        from_json(data, model)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout_seconds": "soon"},
        {"unresponsive_seconds": True},
        {"max_attempts": 1.5},
        {"retry_condition": "failed"},
    ],
)
def test_config_rejects_wrong_types_with_value_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RolloutConfig(**kwargs)


def test_models_are_built_with_keywords() -> None:
    span = Span(rollout_id="r", attempt_id="a", sequence_id=1, trace_id="t", span_id="s", name="n")
    assert (span.parent_id, span.start_time, span.end_time, span.attributes) == (None, None, None, {})
    assert ResourcesUpdate("rs", {"a": 1}).version == 1
    config = RolloutConfig()
    assert (config.timeout_seconds, config.unresponsive_seconds, config.max_attempts) == (None, None, 1)
    assert config.retry_condition == []


def test_statuses_are_the_contracts() -> None:
    assert ROLLOUT_STATUSES == {
        "queuing",
        "preparing",
        "running",
        "succeeded",
        "failed",
        "cancelled",
        "requeuing",
    }
    assert ATTEMPT_STATUSES == {"preparing", "running", "succeeded", "failed", "unresponsive", "timeout"}
    assert TERMINAL_ROLLOUT_STATUSES == {"succeeded", "failed", "cancelled"}


def test_unset_pickles_as_itself() -> None:
    assert pickle.loads(pickle.dumps(UNSET)) is UNSET
    assert not UNSET


# ---------------------------------------------------------------------------------- pickling the store


@pytest.fixture(params=BOTH_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _populated() -> tuple[InMemoryLightningStore, dict[str, Any]]:
    store = InMemoryLightningStore()
    res = await store.add_resources({"model": "m"})
    config = RolloutConfig(max_attempts=2, retry_condition=["failed"], unresponsive_seconds=60)
    queued = await store.enqueue_many_rollouts([{"input": i, "config": config} for i in range(3)])
    claimed = await store.dequeue_rollout(worker_id="w")
    assert claimed is not None
    span = Span(
        rollout_id=claimed.rollout_id,
        attempt_id=claimed.attempt.attempt_id,
        sequence_id=await store.get_next_span_sequence_id(claimed.rollout_id, claimed.attempt.attempt_id),
        trace_id="t",
        span_id="s",
        name="n",
    )
    await store.add_span(span)
    return store, {"res": res, "queued": queued, "claimed": claimed}


async def _snapshot(store: InMemoryLightningStore) -> dict[str, Any]:
    rollouts = await store.query_rollouts()
    return {
        "rollouts": rollouts,
        "attempts": [await store.query_attempts(r.rollout_id) for r in rollouts],
        "spans": [await store.query_spans(r.rollout_id) for r in rollouts],
        "resources": await store.query_resources(),
        "latest": await store.get_latest_resources(),
        "workers": await store.query_workers(),
        "stats": await store.statistics(),
    }


@pytest.mark.anyio
async def test_pickled_store_is_a_copy_of_its_state(anyio_backend: str) -> None:
    store, made = await _populated()
    before = await _snapshot(store)
    copy = pickle.loads(pickle.dumps(store))
    assert isinstance(copy, InMemoryLightningStore)
    assert await _snapshot(copy) == before

    # the copy carries on where the original was: queue order, sequence ids, attempts
    claimed = made["claimed"]
    assert await copy.get_next_span_sequence_id(claimed.rollout_id, claimed.attempt.attempt_id) == 2
    nxt = await copy.dequeue_rollout()
    assert nxt is not None and nxt.rollout_id == made["queued"][1].rollout_id
    await copy.update_attempt(claimed.rollout_id, "latest", status="failed")
    retried = [await copy.dequeue_rollout() for _ in range(2)]
    assert [r.rollout_id for r in retried if r] == [made["queued"][2].rollout_id, claimed.rollout_id]

    # ... and is independent of the original
    assert await _snapshot(store) == before


@pytest.mark.anyio
async def test_pickling_while_someone_waits(anyio_backend: str) -> None:
    store = InMemoryLightningStore()
    started = await store.start_rollout(1)
    rid = started.rollout_id
    woken: list[str] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                woken.extend(r.status for r in await store.wait_for_rollouts(rollout_ids=[rid]))

            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            copy = pickle.loads(pickle.dumps(store))  # the waiter stays with the original
            await copy.update_attempt(rid, "latest", status="failed")
            await anyio.wait_all_tasks_blocked()
            assert woken == []
            await store.update_attempt(rid, "latest", status="succeeded")
    assert woken == ["succeeded"]
    assert [r.status for r in await copy.wait_for_rollouts(rollout_ids=[rid], timeout=0)] == ["failed"]


@pytest.mark.anyio
async def test_locked_store_pickles_with_a_fresh_lock(anyio_backend: str) -> None:
    store, _ = await _populated()
    locked = LightningStoreLocked(store)
    copy = pickle.loads(pickle.dumps(locked))
    assert isinstance(copy, LightningStoreLocked)
    assert await copy.statistics() == await locked.statistics()
    assert await copy.enqueue_rollout("more") is not None
    assert (await copy.statistics())["total_rollouts"] == (await locked.statistics())["total_rollouts"] + 1

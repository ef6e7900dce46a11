"""Store specification: data integrity (issue 16), binding for every store the ``store`` fixture makes.

* A terminal rollout (``succeeded``, ``failed``, ``cancelled``) never changes status or reward
  because of an attempt; only an explicit ``update_rollout`` / ``start_attempt`` moves it on.
* An attempt the watchdog ended (``timeout``; ``unresponsive`` once its rollout moved on) keeps its
  verdict: a late result is refused (nothing changes) and logged.
* What the store keeps is JSON: a value that cannot be encoded is refused where it enters, and
  task inputs, metadata, resources and heartbeat statistics must come back unchanged from a JSON
  round trip (the JSON rule, ``agl_async._validate``), in every store and over HTTP alike.
* ``dequeue_many_rollouts(limit=...)`` takes an integer ``>= 0``.

Every wait is bounded by ``anyio.fail_after`` (a hang guard, not a timing claim).
"""

from __future__ import annotations

import decimal
import logging
import math
from typing import Any

import anyio
import pytest
from conftest import BOTH_BACKENDS, make_span

from agl_async import LightningStore, RolloutConfig

pytestmark = pytest.mark.anyio

HANG_GUARD = 10.0


@pytest.fixture(params=BOTH_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _warnings(caplog: pytest.LogCaptureFixture) -> str:
    records = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("agl_async")]
    return "\n".join(r.getMessage() for r in records)


async def _ended_by_the_watchdog(store: LightningStore, config: RolloutConfig) -> Any:
    started = await store.start_rollout("task", config=config, worker_id="slow")
    with anyio.fail_after(HANG_GUARD):
        await store.wait_for_rollouts(rollout_ids=[started.rollout_id])
    return started


# ---------------------------------------------------------------------- a terminal rollout is final
async def test_a_late_result_does_not_change_a_failed_rollout(
    store: LightningStore, caplog: pytest.LogCaptureFixture
) -> None:
    started = await _ended_by_the_watchdog(store, RolloutConfig(timeout_seconds=0.2))
    rid, aid = started.rollout_id, started.attempt.attempt_id
    before = await store.get_rollout_by_id(rid)
    assert before is not None and before.status == "failed"
    with caplog.at_level(logging.WARNING, logger="agl_async"):
        # the agent returns after all: its span, its reward, its success
        await store.add_span(make_span(rid, aid, 1, attributes={"reward": 1.0}))
        await store.update_rollout(rid, metadata={"reward": 1.0})
        late = await store.update_attempt(rid, aid, status="succeeded")
    assert late.status == "timeout"
    after = await store.get_rollout_by_id(rid)
    assert after is not None
    assert (after.status, after.end_time, after.metadata.get("reward")) == ("failed", before.end_time, None)
    assert [a.status for a in await store.query_attempts(rid)] == ["timeout"]
    assert len(await store.query_spans(rid)) == 1  # the span itself is kept
    logged = _warnings(caplog)
    assert aid in logged and "watchdog" in logged, logged  # the refusal is logged, naming the attempt
    assert "its reward stays" in logged, logged


async def test_a_status_reported_terminal_never_changes_afterwards(store: LightningStore) -> None:
    started = await _ended_by_the_watchdog(store, RolloutConfig(timeout_seconds=0.1))
    rid, aid = started.rollout_id, started.attempt.attempt_id
    reported = await store.wait_for_rollouts(rollout_ids=[rid], timeout=0)
    await store.update_rollout(rid, metadata={"reward": 1.0})
    await store.update_attempt(rid, aid, status="succeeded")
    await store.update_attempt(rid, aid, status="running")
    again = await store.wait_for_rollouts(rollout_ids=[rid], timeout=0)
    assert [(r.status, r.metadata) for r in again] == [(r.status, r.metadata) for r in reported]


async def test_a_late_span_does_not_revive_the_attempt_of_a_finished_rollout(store: LightningStore) -> None:
    started = await _ended_by_the_watchdog(store, RolloutConfig(unresponsive_seconds=0.1))
    await store.add_span(make_span(started.rollout_id, started.attempt.attempt_id, 1))
    attempt = await store.get_latest_attempt(started.rollout_id)
    assert attempt is not None and attempt.status == "unresponsive"
    rollout = await store.get_rollout_by_id(started.rollout_id)
    assert rollout is not None and rollout.status == "failed"


async def test_a_stale_attempt_cannot_overwrite_the_retry_that_succeeded(store: LightningStore) -> None:
    config = RolloutConfig(timeout_seconds=0.2, max_attempts=2, retry_condition=["timeout"])
    r = await store.enqueue_rollout("task", config=config)
    first = await store.dequeue_rollout(worker_id="slow")
    assert first is not None
    with anyio.fail_after(HANG_GUARD):
        second = await store.dequeue_rollout(worker_id="fast", timeout=HANG_GUARD)  # after the timeout
    assert second is not None and second.attempt.sequence_id == 2
    await store.update_rollout(r.rollout_id, metadata={"reward": 2.0})
    await store.update_attempt(r.rollout_id, second.attempt.attempt_id, status="succeeded")
    # attempt 1 comes back with its own result
    await store.update_rollout(r.rollout_id, metadata={"reward": 0.5, "note": "late"})
    await store.update_attempt(r.rollout_id, first.attempt.attempt_id, status="succeeded")
    got = await store.get_rollout_by_id(r.rollout_id)
    assert got is not None and got.status == "succeeded"
    assert got.metadata == {"reward": 2.0, "note": "late"}  # other metadata may change, the reward not
    assert [a.status for a in await store.query_attempts(r.rollout_id)] == ["timeout", "succeeded"]


async def test_the_latest_attempt_cannot_change_a_terminal_rollout_either(store: LightningStore) -> None:
    started = await store.start_rollout("task", worker_id="w")
    rid = started.rollout_id
    await store.update_attempt(rid, "latest", status="failed")
    await store.update_attempt(rid, "latest", status="succeeded")  # e.g. a retried request
    await store.update_attempt(rid, "latest", status="running")
    rollout = await store.get_rollout_by_id(rid)
    assert rollout is not None and rollout.status == "failed"
    assert await store.dequeue_rollout() is None


async def test_an_operator_may_still_requeue_a_finished_rollout(store: LightningStore) -> None:
    started = await store.start_rollout("task")
    await store.update_attempt(started.rollout_id, "latest", status="failed")
    again = await store.update_rollout(started.rollout_id, status="queuing", metadata={"reward": 0.0})
    assert again.status == "queuing" and again.metadata == {"reward": 0.0}
    claimed = await store.dequeue_rollout()
    assert claimed is not None and claimed.attempt.sequence_id == 2


async def test_an_unresponsive_attempt_comes_back_only_while_its_rollout_waits(store: LightningStore) -> None:
    config = RolloutConfig(unresponsive_seconds=0.1, max_attempts=2, retry_condition=["unresponsive"])
    waiting = await store.start_rollout(1, config=config, worker_id="w")
    # One that fails a little later: when it has, the first one has been judged too.
    clock = await store.start_rollout(2, config=RolloutConfig(unresponsive_seconds=0.1))
    with anyio.fail_after(HANG_GUARD):
        await store.wait_for_rollouts(rollout_ids=[clock.rollout_id])
    rollout = await store.get_rollout_by_id(waiting.rollout_id)
    assert rollout is not None and rollout.status == "requeuing"
    # Its runner was only slow: the result comes after all, and counts.
    await store.update_attempt(waiting.rollout_id, waiting.attempt.attempt_id, status="succeeded")
    rollout = await store.get_rollout_by_id(waiting.rollout_id)
    assert rollout is not None and rollout.status == "succeeded"
    assert await store.dequeue_rollout() is None
    # The clock rollout is finished: its unresponsive attempt stays so.
    await store.update_attempt(clock.rollout_id, clock.attempt.attempt_id, status="succeeded")
    attempt = await store.get_latest_attempt(clock.rollout_id)
    assert attempt is not None and attempt.status == "unresponsive"


# ---------------------------------------------------------------------------- JSON at the door
BAD_VALUES = [
    pytest.param("lone \ud800 surrogate", id="surrogate"),
    pytest.param(math.nan, id="nan"),
    pytest.param(math.inf, id="inf"),
    pytest.param((1, 2), id="tuple"),
    pytest.param(b"bytes", id="bytes"),
    pytest.param({1: "int key"}, id="int-key"),
    pytest.param(decimal.Decimal("0.5"), id="decimal"),
    pytest.param({1, 2}, id="set"),
    pytest.param(object(), id="object"),
]


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("bad", [*BAD_VALUES, pytest.param(_nested(5000), id="deep")])
async def test_what_does_not_survive_json_is_refused_at_entry(store: LightningStore, bad: Any) -> None:
    with pytest.raises(ValueError, match="input"):
        await store.enqueue_rollout({"text": bad})
    with pytest.raises(ValueError, match="input"):
        await store.enqueue_many_rollouts([{"input": 1}, {"input": [bad]}])
    with pytest.raises(ValueError, match="metadata"):
        await store.start_rollout(1, metadata={"m": bad})
    with pytest.raises(ValueError, match="resources"):
        await store.add_resources({"model": bad})
    assert await store.query_rollouts() == []
    assert await store.query_resources() == []
    started = await store.start_rollout("ok")
    resources = await store.add_resources({"model": "m"})
    with pytest.raises(ValueError, match="input"):
        await store.update_rollout(started.rollout_id, input=bad)
    with pytest.raises(ValueError, match="metadata"):
        await store.update_rollout(started.rollout_id, metadata={"m": bad})
    with pytest.raises(ValueError, match="metadata"):
        await store.update_attempt(started.rollout_id, "latest", metadata={"m": bad})
    with pytest.raises(ValueError, match="resources"):
        await store.update_resources(resources.resources_id, {"model": bad})
    with pytest.raises(ValueError, match="heartbeat_stats"):
        await store.update_worker("w", heartbeat_stats={"s": bad})
    got = await store.get_rollout_by_id(started.rollout_id)
    assert got is not None and (got.input, got.metadata) == ("ok", {})
    latest = await store.get_resources_by_id(resources.resources_id)
    assert latest is not None and (latest.resources, latest.version) == ({"model": "m"}, 1)
    assert await store.query_workers() == []  # the bad heartbeat registered no worker


async def test_the_refusal_says_what_would_change(store: LightningStore) -> None:
    with pytest.raises(ValueError, match=r"input\['pair'\] is a tuple, which would come back as a list"):
        await store.enqueue_rollout({"pair": (1, 2)})
    with pytest.raises(ValueError, match=r"nan.*null"):
        await store.enqueue_rollout([1.0, math.nan])
    with pytest.raises(ValueError, match=r"int key 1.*use str keys"):
        await store.enqueue_rollout({1: "a"})


@pytest.mark.parametrize(
    "good",
    [
        {"q": "2+2", "choices": [1, 2.5, True, None], "nested": {"deep": [[{"k": "v"}]]}},
        "ünïcödé ✓",
        2**63 - 1,
        -(2**63),
        [],
        0.1,
    ],
)
async def test_json_values_arrive_exactly_as_enqueued(store: LightningStore, good: Any) -> None:
    await store.enqueue_rollout(good, metadata={"same": good})
    claimed = await store.dequeue_rollout()
    assert claimed is not None
    assert claimed.input == good and type(claimed.input) is type(good)
    assert claimed.metadata == {"same": good}


async def test_spans_must_be_encodable(store: LightningStore) -> None:
    started = await store.start_rollout("task")
    rid, aid = started.rollout_id, started.attempt.attempt_id
    with pytest.raises(ValueError):
        await store.add_span(make_span(rid, aid, 1, name="lone \udc00"))
    with pytest.raises(ValueError):
        bad = make_span(rid, aid, 3, attributes={"x": object()})
        await store.add_many_spans([make_span(rid, aid, 2), bad])
    assert await store.query_spans(rid) == []
    # OpenTelemetry attribute values are often tuples: a span only has to be encodable.
    await store.add_span(make_span(rid, aid, 4, attributes={"tags": ("a", "b")}))
    (span,) = await store.query_spans(rid)
    assert list(span.attributes["tags"]) == ["a", "b"]


async def test_a_surrogate_in_a_worker_id_is_refused(store: LightningStore) -> None:
    await store.enqueue_rollout("task")
    with pytest.raises(ValueError, match=r"worker_id|JSON"):
        await store.dequeue_rollout(worker_id="w\ud800")
    with pytest.raises(ValueError, match=r"worker_id|JSON"):
        await store.update_worker("w\ud800")
    assert await store.query_workers() == []
    claimed = await store.dequeue_rollout(worker_id="w")
    assert claimed is not None  # the refused dequeue claimed nothing


# ----------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("limit", [-5, -1, True, 1.5, "2", None])
async def test_dequeue_many_limit_must_be_a_non_negative_integer(store: LightningStore, limit: Any) -> None:
    await store.enqueue_rollout("task")
    with pytest.raises(ValueError, match="limit"):
        await store.dequeue_many_rollouts(limit=limit)
    assert await store.dequeue_many_rollouts(limit=0) == []
    assert len(await store.dequeue_many_rollouts(limit=5)) == 1

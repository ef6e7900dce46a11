"""Store specification: data integrity (issue 16), binding for every store the ``store`` fixture makes.

* A terminal rollout (``succeeded``, ``failed``, ``cancelled``) never changes status or reward
  because of an attempt; only an explicit ``update_rollout`` / ``start_attempt`` moves it on.
* An attempt the watchdog ended (``timeout``; ``unresponsive`` once its rollout moved on) keeps its
  verdict: a late result is refused (nothing changes) and logged.

Every wait is bounded by ``anyio.fail_after`` (a hang guard, not a timing claim).
"""

from __future__ import annotations

import logging
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

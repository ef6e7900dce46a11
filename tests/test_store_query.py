"""Store specification: ``query_rollouts``' paging, ordering and id search (Agent-Lightning 0.3's
``rollout_id_contains`` / ``sort_by`` / ``sort_order`` / ``limit`` / ``offset``).

Every test runs against every store implementation (``store`` fixture), through the public API.
"""

from __future__ import annotations

import pytest
from conftest import BOTH_BACKENDS

from agl_async import LightningStore
from agl_async.store.base import select_rollouts

pytestmark = pytest.mark.anyio


@pytest.fixture(params=BOTH_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _ids(store: LightningStore, **query: object) -> list[str]:
    return [r.rollout_id for r in await store.query_rollouts(**query)]  # type: ignore[arg-type]


async def test_limit_and_offset_page_through_creation_order(store: LightningStore) -> None:
    made = [r.rollout_id for r in await store.enqueue_many_rollouts([{"input": i} for i in range(7)])]
    assert await _ids(store) == made
    assert await _ids(store, limit=3) == made[:3]
    assert await _ids(store, limit=3, offset=3) == made[3:6]
    assert await _ids(store, limit=3, offset=6) == made[6:]
    assert await _ids(store, offset=5) == made[5:]
    assert await _ids(store, limit=0) == []
    assert await _ids(store, offset=100) == []
    assert await _ids(store, limit=-1, offset=0) == made


async def test_paging_applies_after_the_filters(store: LightningStore) -> None:
    made = [r.rollout_id for r in await store.enqueue_many_rollouts([{"input": i} for i in range(6)])]
    for rollout_id in made[::2]:
        await store.update_rollout(rollout_id, status="succeeded")
    succeeded = await _ids(store, status_in=["succeeded"])
    assert succeeded == made[::2]
    assert await _ids(store, status_in=["succeeded"], limit=2) == succeeded[:2]
    assert await _ids(store, status_in=["succeeded"], limit=2, offset=2) == succeeded[2:4]
    chosen = [made[5], made[1], made[3]]
    assert await _ids(store, rollout_id_in=chosen, limit=2) == chosen[:2]  # the order asked, then paged


async def test_rollout_id_contains_is_a_substring_search(store: LightningStore) -> None:
    a, b = await store.enqueue_many_rollouts([{"input": "a"}, {"input": "b"}])
    assert await _ids(store, rollout_id_contains=a.rollout_id) == [a.rollout_id]
    assert await _ids(store, rollout_id_contains=b.rollout_id[-10:]) == [b.rollout_id]
    assert await _ids(store, rollout_id_contains="") == [a.rollout_id, b.rollout_id]
    assert await _ids(store, rollout_id_contains="no such id") == []
    assert await _ids(store, rollout_id_contains=a.rollout_id, status_in=["running"]) == []


async def test_sort_desc_is_the_exact_reverse_of_asc(store: LightningStore) -> None:
    # One batch: the rollouts may share a start_time, so ties are what is being pinned here.
    await store.enqueue_many_rollouts([{"input": i} for i in range(5)])
    await store.enqueue_rollout("later")
    for field in ("start_time", "rollout_id", "status", "end_time"):
        asc = await _ids(store, sort_by=field)
        assert sorted(asc) == sorted(await _ids(store)), field
        assert await _ids(store, sort_by=field, sort_order="desc") == asc[::-1], field
    newest_first = await _ids(store, sort_by="start_time", sort_order="desc")
    assert newest_first == (await _ids(store))[::-1]
    by_id = await store.query_rollouts(sort_by="rollout_id")
    assert [r.rollout_id for r in by_id] == sorted(r.rollout_id for r in by_id)


async def test_sort_by_end_time_puts_unfinished_rollouts_last(store: LightningStore) -> None:
    a, b, c, d = await store.enqueue_many_rollouts([{"input": x} for x in "abcd"])
    for finishing in (c, a, b):  # d never finishes
        await store.update_rollout(finishing.rollout_id, status="succeeded")
    order = [c.rollout_id, a.rollout_id, b.rollout_id]
    assert await _ids(store, sort_by="end_time") == [*order, d.rollout_id]
    assert await _ids(store, sort_by="end_time", sort_order="desc") == [*order[::-1], d.rollout_id]
    latest_two = await _ids(store, status_in=["succeeded"], sort_by="end_time", sort_order="desc", limit=2)
    assert latest_two == [b.rollout_id, a.rollout_id]
    # Pages of a sorted query cover every match exactly once.
    pages = [await _ids(store, sort_by="end_time", sort_order="desc", limit=3, offset=o) for o in (0, 3)]
    assert pages[0] + pages[1] == [*order[::-1], d.rollout_id]


@pytest.mark.parametrize(
    "query",
    [
        {"sort_by": "input"},
        {"sort_by": "metadata"},
        {"sort_order": "up"},
        {"limit": -2},
        {"limit": True},
        {"limit": 1.5},
        {"offset": -1},
        {"offset": "1"},
        {"rollout_id_contains": 3},
    ],
)
async def test_bad_query_arguments_are_value_errors(store: LightningStore, query: dict[str, object]) -> None:
    await store.enqueue_rollout("x")
    with pytest.raises(ValueError):
        await store.query_rollouts(**query)  # type: ignore[arg-type]


def test_select_rollouts_is_usable_by_any_store() -> None:
    """The pure helper behind the in-memory store (for stores without a query engine)."""
    from agl_async import Rollout

    rollouts = [Rollout(rollout_id=f"ro-{i}", input=i, start_time=float(i % 2)) for i in range(4)]
    picked = select_rollouts(rollouts, sort_by="start_time", sort_order="desc", limit=3, offset=1)
    # start_time: ro-0 0, ro-1 1, ro-2 0, ro-3 1 -> asc ro-0 ro-2 ro-1 ro-3 -> desc ro-3 ro-1 ro-2 ro-0
    assert [r.rollout_id for r in picked] == ["ro-1", "ro-2", "ro-0"]
    assert all(p is rollouts[int(p.rollout_id[3:])] for p in picked)  # the objects given, uncopied
    with pytest.raises(ValueError, match="sort_by"):
        select_rollouts(rollouts, sort_by="input")


async def test_memory_store_start_order_survives_a_clock_step_back() -> None:
    """The in-memory store walks creation order for ``sort_by="start_time"`` while that is the
    start order, and sorts for real once the clock has stepped back."""
    from dashboard_data import replayed_clock

    from agl_async import InMemoryLightningStore

    store = InMemoryLightningStore()
    with replayed_clock(100.0) as clock:
        a = await store.enqueue_rollout("a")
        clock[0] = 200.0
        b = await store.enqueue_rollout("b")
        assert await _ids(store, sort_by="start_time", sort_order="desc") == [b.rollout_id, a.rollout_id]
        clock[0] = 150.0  # an NTP step back
        c = await store.enqueue_rollout("c")
    assert await _ids(store, sort_by="start_time") == [a.rollout_id, c.rollout_id, b.rollout_id]
    assert await _ids(store, sort_by="start_time", sort_order="desc", limit=2) == [b.rollout_id, c.rollout_id]

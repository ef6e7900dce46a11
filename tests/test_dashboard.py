"""The dashboard's server side: its JSON routes against a known store, paging, the token gate
(bearer header, ``?token=`` link -> cookie, pasted token), its assets, and the timeline."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from dashboard_data import KnownStore, populate, replayed_clock

from agl_async import InMemoryLightningStore, LightningStoreServer, Rollout
from agl_async.http.dashboard import MAX_INPUT_BYTES
from agl_async.http.timeline import Timeline, TimelineSource

pytestmark = pytest.mark.anyio
TOKEN = "dashboard-token-123"
FINISHED = ("succeeded", "failed", "cancelled")


@pytest.fixture
async def known() -> AsyncIterator[tuple[InMemoryLightningStore, KnownStore]]:
    store = InMemoryLightningStore()
    yield store, await populate(store)


@pytest.fixture
async def http(known: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a server with no token, over the known store."""
    store, _ = known
    async with LightningStoreServer(store, "127.0.0.1", 0, auth_token="") as server:
        async with httpx.AsyncClient(base_url=server.endpoint) as client:
            yield client


async def test_summary_counts_workers_queue_and_timeline(http: httpx.AsyncClient, known: Any) -> None:
    _, data = known
    summary = (await http.get("/v1/dashboard/summary")).json()
    assert summary["statistics"]["rollouts"] == data.counts
    assert {w["worker_id"] for w in summary["workers"]} == set(data.workers)
    assert summary["workers_total"] == len(data.workers)
    busy = {w["worker_id"] for w in summary["workers"] if w["status"] == "busy"}
    assert len(busy) == data.counts["running"] == 3
    assert all(w["last_heartbeat_time"] for w in summary["workers"])
    queue = summary["queue"]
    assert queue["length"] == data.counts["queuing"] + data.counts["requeuing"]
    assert [r["status"] for r in queue["oldest"]][:1] == ["requeuing"]  # created first of the waiting
    timeline = summary["timeline"]
    assert timeline["finished_total"] == sum(data.counts[s] for s in FINISHED)
    assert sum(timeline["finished"]) == timeline["finished_total"]
    assert sum(timeline["succeeded"]) == data.counts["succeeded"]
    assert timeline["rewards_total"] == len(data.rewards)
    assert len(timeline["t"]) == len(timeline["reward_mean"]) <= 90
    rewards = [r for r in timeline["reward_mean"] if r is not None]
    assert min(data.rewards.values()) <= min(rewards) and max(rewards) <= max(data.rewards.values())
    assert rewards[-1] > rewards[0] + 0.4  # the replayed run learns


async def test_rollouts_page_filter_and_search(http: httpx.AsyncClient, known: Any) -> None:
    store, data = known
    everything = [r.rollout_id for r in await store.query_rollouts(sort_by="start_time", sort_order="desc")]
    first = (await http.get("/v1/dashboard/rollouts", params={"limit": 10})).json()
    assert [r["rollout_id"] for r in first["items"]] == everything[:10]  # newest first
    assert first["total"] == len(everything) and first["has_more"] is True
    second = (await http.get("/v1/dashboard/rollouts", params={"limit": 10, "offset": 10})).json()
    assert [r["rollout_id"] for r in second["items"]] == everything[10:20]
    tail = {"limit": 10, "offset": len(everything) - 3}
    last = (await http.get("/v1/dashboard/rollouts", params=tail)).json()
    assert len(last["items"]) == 3 and last["has_more"] is False

    failed = (await http.get("/v1/dashboard/rollouts", params={"status": "failed", "limit": 500})).json()
    assert failed["total"] == data.counts["failed"] == len(failed["items"])
    assert {r["status"] for r in failed["items"]} == {"failed"}
    live = (await http.get("/v1/dashboard/rollouts", params={"status": "running,queuing"})).json()
    assert live["total"] == data.counts["running"] + data.counts["queuing"]

    wanted = data.traced_rollout_id
    found = (await http.get("/v1/dashboard/rollouts", params={"q": wanted[-8:]})).json()
    assert [r["rollout_id"] for r in found["items"]] == [wanted]
    assert found["total"] is None and found["has_more"] is False  # a search has no count
    assert found["items"][0]["reward"] == data.rewards[wanted]


@pytest.mark.parametrize(
    "params", [{"status": "done"}, {"limit": "0"}, {"limit": "501"}, {"limit": "x"}, {"offset": "-1"}]
)
async def test_bad_rollouts_queries_are_400(http: httpx.AsyncClient, params: dict[str, str]) -> None:
    response = await http.get("/v1/dashboard/rollouts", params=params)
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"


async def test_rollout_detail_has_attempts_and_spans(http: httpx.AsyncClient, known: Any) -> None:
    _, data = known
    detail = (await http.get(f"/v1/dashboard/rollouts/{data.traced_rollout_id}")).json()
    assert detail["rollout"]["rollout_id"] == data.traced_rollout_id
    assert detail["rollout"]["reward"] == data.rewards[data.traced_rollout_id]
    assert [a["status"] for a in detail["attempts"]] == ["failed", "succeeded"]
    first, second = (a["attempt_id"] for a in detail["attempts"])
    names = {a: [s["name"] for s in detail["spans"] if s["attempt_id"] == a] for a in (first, second)}
    assert names[first] == list(data.span_names)
    assert names[second] == [*data.span_names, "agl_async.reward"]
    by_id = {s["span_id"]: s for s in detail["spans"]}
    child = next(s for s in detail["spans"] if s["name"] == "http.get")
    assert by_id[child["parent_id"]]["name"] == "tool.search"
    assert detail["spans_total"] == len(detail["spans"]) == 9
    missing = await http.get("/v1/dashboard/rollouts/ro-nope")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


async def test_a_huge_input_is_previewed_not_shipped() -> None:
    store = InMemoryLightningStore()
    big = await store.enqueue_rollout({"prompt": "x" * (4 * MAX_INPUT_BYTES)})
    small = await store.enqueue_rollout({"prompt": "short"})
    async with LightningStoreServer(store, "127.0.0.1", 0, auth_token="") as server:
        async with httpx.AsyncClient(base_url=server.endpoint) as http:
            big_detail = (await http.get(f"/v1/dashboard/rollouts/{big.rollout_id}")).json()["rollout"]
            small_detail = (await http.get(f"/v1/dashboard/rollouts/{small.rollout_id}")).json()["rollout"]
    assert big_detail["input_truncated"] is True
    assert isinstance(big_detail["input"], str) and len(big_detail["input"]) < MAX_INPUT_BYTES + 10
    assert small_detail == {**small_detail, "input": {"prompt": "short"}, "input_truncated": False}


# ------------------------------------------------------------------------ the token gate

DATA_ROUTES = ["/v1/dashboard/summary", "/v1/dashboard/rollouts", "/v1/dashboard/rollouts/{rid}"]


@pytest.fixture
async def gated(known: Any) -> AsyncIterator[tuple[LightningStoreServer, KnownStore]]:
    store, data = known
    async with LightningStoreServer(store, "127.0.0.1", 0, auth_token=TOKEN) as server:
        yield server, data


async def test_without_the_token_no_data_but_the_page_loads(gated: Any) -> None:
    server, data = gated
    async with httpx.AsyncClient(base_url=server.endpoint) as http:
        for route in DATA_ROUTES:
            response = await http.get(route.format(rid=data.traced_rollout_id))
            assert response.status_code == 401, route
            assert data.traced_rollout_id not in response.text
            assert set(response.json()) == {"error", "detail"}
        wrong = await http.get("/v1/dashboard/summary", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        http.cookies.set(f"agl_dashboard_{server.port}", TOKEN)  # the token itself is not a session
        assert (await http.get("/v1/dashboard/summary")).status_code == 401
        page = await http.get("/")
        assert page.status_code == 200 and "Token required" in page.text
        assert data.traced_rollout_id not in page.text
        for asset in ("static/dashboard.js", "static/dashboard.css", "static/vendor/uplot/uPlot.iife.min.js"):
            assert (await http.get(f"/{asset}")).status_code == 200, asset


async def test_the_bearer_token_opens_the_data(gated: Any) -> None:
    server, data = gated
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=server.endpoint, headers=bearer) as http:
        for route in DATA_ROUTES:
            assert (await http.get(route.format(rid=data.traced_rollout_id))).status_code == 200, route


async def test_a_token_link_sets_a_strict_httponly_cookie_and_redirects(gated: Any) -> None:
    server, data = gated
    async with httpx.AsyncClient(base_url=server.endpoint) as http:
        response = await http.get("/", params={"token": TOKEN})
        assert response.status_code == 303
        assert response.headers["location"] == "./"  # the token leaves the address bar
        cookie = response.headers["set-cookie"]
        name, _, rest = cookie.partition("=")
        assert name == f"agl_dashboard_{server.port}"
        attributes = {part.strip().lower() for part in rest.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/"} <= attributes
        assert TOKEN not in cookie  # an HMAC of it, not the token
        assert "secure" not in attributes  # plain HTTP here
        for route in DATA_ROUTES:
            assert (await http.get(route.format(rid=data.traced_rollout_id))).status_code == 200, route
        # The cookie opens the dashboard's read-only routes only, not the store.
        assert (await http.post("/v1/enqueue_rollout", json={"input": 1})).status_code == 401


async def test_a_wrong_token_link_sets_nothing(gated: Any) -> None:
    server, _ = gated
    async with httpx.AsyncClient(base_url=server.endpoint) as http:
        response = await http.get("/", params={"token": "wrong"})
        assert response.status_code == 303
        assert response.headers["location"] == "./#token-rejected"
        assert "set-cookie" not in response.headers
        assert (await http.get("/v1/dashboard/summary")).status_code == 401


async def test_a_pasted_token_gets_the_cookie(gated: Any) -> None:
    server, _ = gated
    async with httpx.AsyncClient(base_url=server.endpoint) as http:
        wrong = await http.post("/v1/dashboard/session", json={"token": "wrong"})
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        not_json = await http.post("/v1/dashboard/session", content=f"token={TOKEN}")
        assert not_json.status_code == 415
        malformed = await http.post(
            "/v1/dashboard/session", content=b"{", headers={"Content-Type": "application/json"}
        )
        assert malformed.status_code == 400
        ok = await http.post("/v1/dashboard/session", json={"token": TOKEN})
        assert ok.status_code == 204 and "httponly" in ok.headers["set-cookie"].lower()
        assert (await http.get("/v1/dashboard/summary")).status_code == 200


async def test_no_token_means_open_and_a_token_link_is_harmless(http: httpx.AsyncClient) -> None:
    assert (await http.get("/v1/dashboard/summary")).status_code == 200
    response = await http.get("/", params={"token": "anything"})
    assert response.status_code == 303 and "set-cookie" not in response.headers


# ------------------------------------------------------------------------ page and assets


async def test_page_and_assets_headers(http: httpx.AsyncClient) -> None:
    page = await http.get("/")
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert page.headers["referrer-policy"] == "no-referrer"
    script = await http.get("/static/dashboard.js")
    assert script.headers["content-type"].startswith("text/javascript")
    again = await http.get("/static/dashboard.js", headers={"If-None-Match": script.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    lib = await http.get("/static/vendor/uplot/uPlot.iife.min.js")
    assert lib.status_code == 200 and b"uPlot" in lib.content[:200]
    for missing in ("/static/nope.js", "/static/../dashboard.py", "/static/index.html", "/static/vendor"):
        assert (await http.get(missing)).status_code == 404, missing


async def test_the_dashboard_can_be_switched_off() -> None:
    store = InMemoryLightningStore()
    async with LightningStoreServer(store, "127.0.0.1", 0, auth_token="", dashboard=False) as server:
        async with httpx.AsyncClient(base_url=server.endpoint) as http:
            assert (await http.get("/")).status_code == 404
            assert (await http.get("/v1/dashboard/summary")).status_code == 404


def test_assets_ship_in_the_package() -> None:
    """The page's files are package data (in the wheel; no build step at install time)."""
    from importlib.resources import files
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    static = files("agl_async.http") / "static"
    for name in ("index.html", "dashboard.js", "dashboard.css"):
        assert (static / name).is_file()
    for name in ("uPlot.iife.min.js", "uPlot.min.css", "LICENSE"):
        assert (static / "vendor" / "uplot" / name).is_file()
    root = Path(__file__).parents[1]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["agl_async"]
    shipped = {p for pattern in patterns for p in (root / "agl_async").glob(pattern) if p.is_file()}
    on_disk = {p for p in (root / "agl_async" / "http" / "static").rglob("*") if p.is_file()}
    assert on_disk and on_disk <= shipped


# ------------------------------------------------------------------------ the timeline


def _finished(rollout_id: str, end: float, status: str = "succeeded", reward: float | None = None) -> Rollout:
    metadata = {} if reward is None else {"reward": reward}
    return Rollout(rollout_id=rollout_id, input=None, status=status, end_time=end, metadata=metadata)  # type: ignore[arg-type]


def test_timeline_counts_each_rollout_once_and_stays_bounded() -> None:
    timeline = Timeline(target_buckets=10)
    assert timeline.add(_finished("a", 100.2, reward=1.0))
    assert not timeline.add(_finished("a", 100.2, reward=1.0))  # already counted
    assert not timeline.add(Rollout(rollout_id="b", input=None, status="running"))
    assert timeline.add(_finished("c", 100.7, status="failed"))
    snap = timeline.snapshot()
    assert snap["finished"] == [2] and snap["succeeded"] == [1] and snap["failed"] == [1]
    assert snap["reward_mean"] == [1.0] and snap["bucket_seconds"] == 1.0
    for i in range(1000):  # 1000 s later: buckets double until at most 10 of them span it all
        timeline.add(_finished(f"r{i}", 101.0 + i, reward=0.5))
    snap = timeline.snapshot()
    assert len(snap["t"]) <= 10 and sum(snap["finished"]) == timeline.count == 1002
    assert snap["bucket_seconds"] >= 100
    gaps = Timeline()
    gaps.add(_finished("x", 10.0))
    gaps.add(_finished("y", 13.0, reward=2.0))
    assert gaps.snapshot()["finished"] == [1, 0, 0, 1]  # empty buckets in between are there
    assert gaps.snapshot()["reward_mean"] == [None, None, None, 2.0]


async def test_timeline_source_catches_up_with_new_and_missed_rollouts() -> None:
    store = InMemoryLightningStore()
    source = TimelineSource(store, min_interval=0.0, page=4, rebuild_interval=0.0)
    assert (await source.get(0))["finished_total"] == 0
    made = await store.enqueue_many_rollouts([{"input": i} for i in range(10)])
    for r in made[:6]:
        await store.update_rollout(r.rollout_id, status="succeeded", metadata={"reward": 1.0})
    assert (await source.get(6))["finished_total"] == 6  # pages of 4 rollouts
    for r in made[6:]:
        await store.update_rollout(r.rollout_id, status="failed")
    snap = await source.get(10)
    assert snap["finished_total"] == 10 and sum(snap["failed"]) == 4 and snap["rewards_total"] == 6
    # A rollout whose end time is older than what was seen (as a watchdog verdict stamped at an
    # old deadline can be) is missed by the incremental step; the store's count shows it, and the
    # next refresh rebuilds the timeline from scratch.
    late = await store.enqueue_rollout("late")
    with replayed_clock(time.time() - 3600):
        await store.update_rollout(late.rollout_id, status="succeeded")
    assert (await source.get(11))["finished_total"] == 10  # missed, and noticed
    assert (await source.get(11))["finished_total"] == 11  # rebuilt


async def test_timeline_is_shared_between_pollers_within_min_interval() -> None:
    store = InMemoryLightningStore()
    source = TimelineSource(store, min_interval=3600.0)
    await source.get(0)
    r = await store.enqueue_rollout("x")
    await store.update_rollout(r.rollout_id, status="succeeded")
    assert (await source.get(1))["finished_total"] == 0  # not refreshed again within the hour

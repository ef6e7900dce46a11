"""``GET /metrics``: Prometheus exposition of the store server, parsed with prometheus_client's own
parser; the numbers move as calls are made; same auth as the store routes; per-server registries;
a clear 501 without the extra. Plus the request-metrics middleware on its own."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from conftest import make_span

from agl_async import InMemoryLightningStore, LightningStoreClient, LightningStoreServer
from agl_async.http.request_metrics import OTHER, Histogram, RequestMetrics, RouteTemplates

prometheus_client = pytest.importorskip("prometheus_client", reason="the metrics extra is not installed")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.anyio
TOKEN = "s3cret-metrics-token"


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
async def served() -> AsyncIterator[tuple[LightningStoreServer, LightningStoreClient, httpx.AsyncClient]]:
    async with LightningStoreServer(InMemoryLightningStore(), "127.0.0.1", 0, auth_token=TOKEN) as server:
        async with LightningStoreClient(server.endpoint, auth_token=TOKEN) as client:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(base_url=server.endpoint, headers=headers) as http:
                yield server, client, http


async def scrape(http: httpx.AsyncClient) -> dict[Any, float]:
    response = await http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


async def test_request_counts_and_latency_move_with_calls(served: Any) -> None:
    _, client, http = served
    before = await scrape(http)
    route = {"route": "/v1/enqueue_rollout", "method": "POST"}
    assert value(before, "agl_http_requests_total", status="200", **route) == 0
    for i in range(3):
        await client.enqueue_rollout({"i": i})
    with pytest.raises(ValueError):
        await client.update_rollout("ro-missing", status="failed")  # a 400
    after = await scrape(http)
    assert value(after, "agl_http_requests_total", status="200", **route) == 3
    bad = {"route": "/v1/update_rollout", "method": "POST", "status": "400"}
    assert value(after, "agl_http_requests_total", **bad) == 1
    assert value(after, "agl_http_request_duration_seconds_count", **route) == 3
    assert value(after, "agl_http_request_duration_seconds_bucket", le="+Inf", **route) == 3
    assert 0 < value(after, "agl_http_request_duration_seconds_sum", **route) < 30
    # Buckets are cumulative and end at the count.
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in after.items()
        if name == "agl_http_request_duration_seconds_bucket" and dict(labels).get("route") == route["route"]
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets) and buckets[-1][1] == 3
    # The scrape before this one was counted too (under its own route).
    assert value(after, "agl_http_requests_total", route="/metrics", method="GET", status="200") >= 1
    assert value(after, "agl_http_requests_in_flight") == 1  # this very scrape


async def test_store_gauges_follow_the_store(served: Any) -> None:
    _, client, http = served
    first = await scrape(http)
    assert value(first, "agl_store_up") == 1
    assert value(first, "agl_store_rollouts", status="queuing") == 0
    await client.enqueue_many_rollouts([{"input": i} for i in range(4)])
    claimed = await client.dequeue_rollout(worker_id="w1")
    assert claimed is not None
    spans = [make_span(claimed.rollout_id, claimed.attempt.attempt_id, k) for k in (1, 2)]
    await client.add_many_spans(spans)
    second = await scrape(http)
    assert value(second, "agl_store_rollouts", status="queuing") == 3
    assert value(second, "agl_store_rollouts", status="running") == 1  # a span is a heartbeat
    assert value(second, "agl_store_attempts", status="running") == 1
    assert value(second, "agl_store_workers", status="busy") == 1
    assert value(second, "agl_store_queue_length") == 3
    assert value(second, "agl_store_spans") == 2
    await client.update_attempt(claimed.rollout_id, claimed.attempt.attempt_id, status="succeeded")
    third = await scrape(http)
    assert value(third, "agl_store_rollouts", status="succeeded") == 1
    assert value(third, "agl_store_workers", status="idle") == 1
    assert value(third, "agl_store_workers", status="busy") == 0
    assert value(third, "agl_store_statistics_duration_seconds") > 0


async def test_process_collectors_are_exposed(served: Any) -> None:
    _, _, http = served
    samples = await scrape(http)
    names = {name for name, _ in samples}
    assert "python_info" in names
    assert any(n.startswith("python_gc_") for n in names)
    if sys.platform == "linux":
        assert value(samples, "process_resident_memory_bytes") > 0
        assert "process_cpu_seconds_total" in names


async def test_metrics_take_the_store_routes_auth(served: Any) -> None:
    server, _, _ = served
    async with httpx.AsyncClient(base_url=server.endpoint) as anonymous:
        missing = await anonymous.get("/metrics")
        wrong = await anonymous.get("/metrics", headers={"Authorization": "Bearer nope"})
        # The dashboard's session cookie opens the dashboard, not the metrics.
        login = await anonymous.get(f"/?token={TOKEN}", follow_redirects=False)
        assert login.status_code == 303 and anonymous.cookies
        with_cookie = await anonymous.get("/metrics")
    for response in (missing, wrong, with_cookie):
        assert response.status_code == 401
        assert response.json()["error"] == "unauthorized"
        assert "agl_" not in response.text


async def test_routes_are_labelled_by_template_not_raw_path(served: Any) -> None:
    _, _, http = served
    for rollout_id in ("ro-1", "ro-2", "ro-3"):
        assert (await http.get(f"/v1/dashboard/rollouts/{rollout_id}")).status_code == 404
    for path in ("/nope", "/wp-login.php", "/v1/nope"):
        assert (await http.get(path)).status_code == 404
    samples = await scrape(http)
    template = "/v1/dashboard/rollouts/{rollout_id}"
    assert value(samples, "agl_http_requests_total", route=template, method="GET", status="404") == 3
    assert value(samples, "agl_http_requests_total", route=OTHER, method="GET", status="404") == 3
    routes = {dict(labels).get("route") for name, labels in samples if name == "agl_http_requests_total"}
    assert not any(r and ("ro-1" in r or "wp-login" in r) for r in routes)


async def test_each_server_has_its_own_registry() -> None:
    async with LightningStoreServer(InMemoryLightningStore(), "127.0.0.1", 0, auth_token="") as a:
        async with LightningStoreServer(InMemoryLightningStore(), "127.0.0.1", 0, auth_token="") as b:
            async with LightningStoreClient(a.endpoint) as client_a:
                for _ in range(5):
                    await client_a.enqueue_rollout("x")
            async with httpx.AsyncClient() as http:
                samples_a = parse((await http.get(f"{a.endpoint}/metrics")).text)
                samples_b = parse((await http.get(f"{b.endpoint}/metrics")).text)
    route = {"route": "/v1/enqueue_rollout", "method": "POST", "status": "200"}
    assert value(samples_a, "agl_http_requests_total", **route) == 5
    assert value(samples_b, "agl_http_requests_total", **route) == 0
    assert value(samples_a, "agl_store_rollouts", status="queuing") == 5
    assert value(samples_b, "agl_store_rollouts", status="queuing") == 0


async def test_openmetrics_is_served_when_asked_for() -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

    async with LightningStoreServer(InMemoryLightningStore(), "127.0.0.1", 0, auth_token="") as server:
        async with httpx.AsyncClient() as http:
            accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
            response = await http.get(f"{server.endpoint}/metrics", headers=accept)
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
    names = {family.name for family in parse_openmetrics(response.text)}
    assert {"agl_http_requests", "agl_store_rollouts", "agl_store_up"} <= names


class _BrokenStatistics(InMemoryLightningStore):
    async def statistics(self) -> dict[str, Any]:
        raise ConnectionError("database unreachable")


async def test_a_failing_store_still_scrapes_with_store_up_0(caplog: pytest.LogCaptureFixture) -> None:
    async with LightningStoreServer(_BrokenStatistics(), "127.0.0.1", 0, auth_token="") as server:
        async with httpx.AsyncClient() as http:
            response = await http.get(f"{server.endpoint}/metrics")
    assert response.status_code == 200
    samples = parse(response.text)
    assert value(samples, "agl_store_up") == 0
    assert not any(name == "agl_store_rollouts" for name, _ in samples)
    assert "database unreachable" in caplog.text


async def test_without_the_extra_metrics_answer_501_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    store = InMemoryLightningStore()
    async with LightningStoreServer(store, "127.0.0.1", 0, auth_token=TOKEN) as server:
        # no middleware counting what nobody can scrape
        assert "request_metrics" not in server.app.extensions
        async with httpx.AsyncClient(base_url=server.endpoint) as http:
            assert (await http.get("/metrics")).status_code == 401  # auth first
            response = await http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        async with LightningStoreClient(server.endpoint, auth_token=TOKEN) as client:
            await client.enqueue_rollout("still works")
    assert response.status_code == 501
    assert response.json()["error"] == "not_implemented"
    assert 'pip install "agl-async[metrics]"' in response.json()["detail"]


async def test_metrics_can_be_switched_off() -> None:
    store = InMemoryLightningStore()
    async with LightningStoreServer(store, "127.0.0.1", 0, auth_token="", metrics=False) as server:
        assert "request_metrics" not in server.app.extensions and "metrics" not in server.app.extensions
        async with httpx.AsyncClient() as http:
            response = await http.get(f"{server.endpoint}/metrics")
    assert response.status_code == 404


# ------------------------------------------------------------------------ the middleware alone


def test_histogram_buckets_are_upper_bounds_inclusive() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(v)
    assert h.cumulative() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    assert h.count == 5 and h.sum == pytest.approx(4.65)


async def _asgi(app: Any, path: str = "/x", method: str = "GET", scope_type: str = "http") -> list[Any]:
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await app({"type": scope_type, "path": path, "method": method}, receive, send)
    return sent


async def test_middleware_counts_failures_and_cancellations() -> None:
    async def ok(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def crash(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("bug")

    async def hang(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.Event().wait()

    resolve = RouteTemplates(["/x"])
    for app, expected in ((ok, "204"), (crash, "500"), (hang, "none")):
        metrics = RequestMetrics(app, resolve)
        if app is hang:
            task = asyncio.ensure_future(_asgi(metrics))
            await asyncio.sleep(0)
            assert metrics.in_flight == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        elif app is crash:
            with pytest.raises(RuntimeError):
                await _asgi(metrics)
        else:
            await _asgi(metrics)
        assert metrics.requests == {("/x", "GET", expected): 1}
        assert metrics.in_flight == 0
    odd = RequestMetrics(ok, resolve)
    await _asgi(odd, "/y", method="BREW")
    assert odd.requests == {(OTHER, OTHER, "204"): 1}  # unknown path and method: bounded labels
    await _asgi(odd, scope_type="lifespan")
    assert sum(odd.requests.values()) == 1  # only http is measured

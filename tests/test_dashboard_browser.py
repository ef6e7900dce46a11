"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright for Python,
against a server over a known store. Skipped, with the reason, where Chromium or Playwright is
missing (CI installs both: the ``chromium`` Debian package and the ``test`` extra)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from dashboard_data import KnownStore, populate

from agl_async import InMemoryLightningStore, LightningStoreServer

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("no_leftover_processes")]

CHROMIUM = os.environ.get("AGL_CHROMIUM", "/usr/bin/chromium")
# This machine (and CI) has no outside network: without these Chromium keeps trying to reach
# Google's services at every start.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "browser-token-456"
TIMEOUT_MS = 20_000
DASH = "\u2013"  # the page writes ranges as 1\u201325

if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)) and not shutil.which("chromium"):
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)", allow_module_level=True)
playwright_api = pytest.importorskip(
    "playwright.async_api", reason='Playwright for Python is missing (pip install "agl-async[test]")'
)
expect = playwright_api.expect


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Any]:
    """A fresh headless Chromium context (its own user-data-dir under tmp_path)."""
    async with playwright_api.async_playwright() as p:
        context = await p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context
        finally:
            await context.close()


@pytest.fixture
async def known() -> tuple[InMemoryLightningStore, KnownStore]:
    store = InMemoryLightningStore()
    return store, await populate(store)


def _watch(page: Any) -> list[str]:
    """Collect the page's script errors and CSP violations (they must stay empty)."""
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"pageerror: {error}"))
    page.on(
        "console",
        lambda message: problems.append(f"console: {message.text}") if message.type == "error" else None,
    )
    return problems


def _card(page: Any, status: str) -> Any:
    return page.locator(f'#status-cards [data-status="{status}"] .value')


async def _count(page: Any, status: str) -> str:
    text: str = await _card(page, status).inner_text()
    return text


async def test_counts_reward_chart_and_a_rollouts_spans(browser: Any, known: Any, tmp_path: Path) -> None:
    store, data = known
    async with LightningStoreServer(store, "127.0.0.1", 0, auth_token="") as server:
        page = await browser.new_page()
        problems = _watch(page)
        await page.goto(f"{server.endpoint}/")
        await page.wait_for_selector("#content:not([hidden])", timeout=TIMEOUT_MS)
        await expect(_card(page, "succeeded")).not_to_have_text("—", timeout=TIMEOUT_MS)
        for status, n in data.counts.items():
            assert await _count(page, status) == f"{n:,}", status
        assert await _count(page, "total") == f"{sum(data.counts.values()):,}"

        # The reward chart: a uPlot canvas with one point per interval that had rewards.
        await page.wait_for_selector("#reward-chart canvas", timeout=TIMEOUT_MS)
        points = int(await page.get_attribute("#reward-chart", "data-points") or 0)
        assert points >= 10
        assert await page.locator("#throughput-chart canvas").count() >= 1
        workers = await page.locator("#workers tbody tr").all_inner_texts()
        assert {w.split()[0] for w in workers} == set(data.workers)

        # One rollout: found by searching its id, opened from the table.
        await page.fill("#search", data.traced_rollout_id[-8:])
        row = page.locator(f'#rollouts tbody tr[data-rollout-id="{data.traced_rollout_id}"]')
        await row.wait_for(timeout=TIMEOUT_MS)
        assert await page.locator("#rollouts tbody tr").count() == 1
        await row.click()
        await page.wait_for_selector("#detail:not([hidden]) .span-node", timeout=TIMEOUT_MS)
        assert await page.inner_text("#detail-id") == data.traced_rollout_id
        attempts = await page.locator("#attempts tbody tr").all_inner_texts()
        assert ["failed" in attempts[0], "succeeded" in attempts[1]] == [True, True]
        sections = page.locator("#spans .attempt-spans")
        assert await sections.count() == 2
        # The tree: http.get under tool.search under agent.run, in each attempt.
        nested = sections.nth(1).locator(
            '.span-node[data-span-name="agent.run"] .span-node[data-span-name="tool.search"] '
            '.span-node[data-span-name="http.get"]'
        )
        assert await nested.count() == 1
        nodes = sections.nth(1).locator(".span-node")
        names = await nodes.evaluate_all("ns => ns.map(n => n.dataset.spanName)")
        assert sorted(names) == sorted([*data.span_names, "agl_async.reward"])
        # Attributes show when a span is opened, as text (the "<b>" in one is not markup).
        search = sections.nth(1).locator('.span-node[data-span-name="tool.search"] > details')
        await search.locator("summary").click()
        attributes = await search.locator(".attrs").inner_text()
        assert "query" in attributes and "<b>not html</b>" in attributes
        assert await page.locator("#spans b").count() == 0
        reward = sections.nth(1).locator('.span-node[data-span-name="agl_async.reward"] > details')
        await reward.locator("summary").click()
        assert str(data.rewards[data.traced_rollout_id]) in await reward.locator(".attrs").inner_text()

        await page.evaluate("window.scrollTo(0, 0)")
        shot = tmp_path / "dashboard.png"
        await page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 20_000
        if target := os.environ.get("AGL_DASHBOARD_SCREENSHOT"):  # docs/: see docs/observing.md
            await page.screenshot(path=target)
            await page.locator("#detail").screenshot(path=target.replace(".png", "-rollout.png"))
        assert problems == []


async def test_the_page_updates_itself(browser: Any, known: Any) -> None:
    store, data = known
    async with LightningStoreServer(store, "127.0.0.1", 0, auth_token="") as server:
        page = await browser.new_page()
        problems = _watch(page)
        await page.goto(f"{server.endpoint}/")
        queuing = f"{data.counts['queuing']:,}"
        await expect(_card(page, "queuing")).to_have_text(queuing, timeout=TIMEOUT_MS)
        await store.enqueue_many_rollouts([{"input": i} for i in range(5)])  # no reload: the page polls
        more = f"{data.counts['queuing'] + 5:,}"
        await expect(_card(page, "queuing")).to_have_text(more, timeout=TIMEOUT_MS)
        # A status card filters the table; "all rollouts" clears the filter.
        failed = data.counts["failed"]
        await page.click('#status-cards [data-status="failed"]')
        info = page.locator("#page-info")
        await expect(info).to_have_text(f"1{DASH}{failed} of {failed}", timeout=TIMEOUT_MS)
        assert set(await page.locator("#rollouts tbody .badge").all_inner_texts()) == {"failed"}
        await page.click('#status-cards [data-status="total"]')
        total = sum(data.counts.values()) + 5
        await expect(info).to_have_text(f"1{DASH}25 of {total:,}", timeout=TIMEOUT_MS)
        await page.click("#next")
        await expect(info).to_have_text(f"26{DASH}50 of {total:,}", timeout=TIMEOUT_MS)
        assert problems == []


async def test_no_data_without_the_token_and_all_of_it_after_the_link(browser: Any, known: Any) -> None:
    store, data = known
    async with LightningStoreServer(store, "127.0.0.1", 0, auth_token=TOKEN) as server:
        page = await browser.new_page()
        answers: list[tuple[str, int]] = []
        page.on("response", lambda r: answers.append((r.url, r.status)))
        await page.goto(f"{server.endpoint}/#rollout={data.traced_rollout_id}")
        await page.wait_for_selector("#token-gate:not([hidden])", timeout=TIMEOUT_MS)
        assert await page.is_hidden("#content")
        data_answers = [(url, status) for url, status in answers if "/v1/dashboard/" in url]
        assert data_answers and all(status == 401 for _, status in data_answers)
        html = await page.content()
        assert data.traced_rollout_id not in html.replace(f"#rollout={data.traced_rollout_id}", "")
        assert await browser.cookies() == []

        # A wrong link: told so, still nothing.
        await page.goto(f"{server.endpoint}/?token=wrong")
        await page.wait_for_selector("#token-rejected:not([hidden])", timeout=TIMEOUT_MS)
        assert await browser.cookies() == []

        # The link printed by `agl-async serve`: a cookie, the token gone from the address bar.
        await page.goto(f"{server.endpoint}/?token={TOKEN}")
        await page.wait_for_selector("#content:not([hidden])", timeout=TIMEOUT_MS)
        assert "token" not in page.url
        [cookie] = await browser.cookies()
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]
        assert await page.evaluate("document.cookie") == ""  # HttpOnly: not readable by scripts
        await expect(_card(page, "succeeded")).not_to_have_text("—", timeout=TIMEOUT_MS)
        assert await _count(page, "succeeded") == f"{data.counts['succeeded']:,}"


async def test_a_pasted_token_opens_the_dashboard(browser: Any, known: Any) -> None:
    store, data = known
    async with LightningStoreServer(store, "127.0.0.1", 0, auth_token=TOKEN) as server:
        page = await browser.new_page()
        await page.goto(f"{server.endpoint}/")
        await page.wait_for_selector("#token-gate:not([hidden])", timeout=TIMEOUT_MS)
        await page.fill("#token-input", "not it")
        await page.click("#token-form button")
        await page.wait_for_selector("#token-rejected:not([hidden])", timeout=TIMEOUT_MS)
        await page.fill("#token-input", TOKEN)
        await page.click("#token-form button")
        await page.wait_for_selector("#content:not([hidden])", timeout=TIMEOUT_MS)
        await expect(_card(page, "failed")).not_to_have_text("—", timeout=TIMEOUT_MS)
        assert await _count(page, "failed") == f"{data.counts['failed']:,}"

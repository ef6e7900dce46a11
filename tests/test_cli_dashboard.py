"""``agl-async serve`` and ``agl-async demo --dashboard`` print the dashboard's URL (with the token
when there is one: printed once on stdout, never logged), and the URL works."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
from test_cli import Proc, alive, descendants, needs_proc

from agl_async.http.dashboard import dashboard_url
from agl_async.testing import free_port

TOKEN = "tok/with+odd=chars&more"  # needs quoting in a URL


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:  # only after a failed test: never leave anything running
        proc.kill()


def test_dashboard_url_quotes_the_token() -> None:
    assert dashboard_url("http://127.0.0.1:4747", None) == "http://127.0.0.1:4747/"
    assert dashboard_url("https://h:1/", "a b&c") == "https://h:1/?token=a%20b%26c"


def test_serve_prints_the_dashboard_link_once_and_logs_no_token(procs: list[Proc]) -> None:
    port = free_port()
    args = ("serve", "--host", "127.0.0.1", "--port", str(port), "--token", TOKEN)
    server = Proc("--log-level", "DEBUG", *args)
    procs.append(server)
    match = server.wait_for_line(r"dashboard: (\S+)")
    url = match.group(1)
    assert url == f"http://127.0.0.1:{port}/?token={quote(TOKEN, safe='')}"
    with httpx.Client(follow_redirects=True) as browser:  # as a browser opening the link
        assert browser.get(url).status_code == 200
        assert browser.get(f"http://127.0.0.1:{port}/v1/dashboard/summary").status_code == 200
    server.popen.send_signal(signal.SIGINT)
    assert server.wait() == 0, server.output
    # stdout and stderr (merged): the token appears in the one printed link, nowhere else
    assert server.output.count(TOKEN) + server.output.count(quote(TOKEN, safe="")) == 1, server.output


def test_serve_without_a_token_prints_a_plain_link(procs: list[Proc]) -> None:
    port = free_port()
    server = Proc("serve", "--host", "127.0.0.1", "--port", str(port), "--token", "")
    procs.append(server)
    url = server.wait_for_line(r"dashboard: (\S+)").group(1)
    assert url == f"http://127.0.0.1:{port}/"
    assert httpx.get(f"{url}v1/dashboard/summary").status_code == 200
    server.popen.send_signal(signal.SIGINT)
    assert server.wait() == 0, server.output


@needs_proc
@pytest.mark.parametrize("mode", ["shm", "cs"])
def test_demo_dashboard_shows_the_run_and_stays_up_until_ctrl_c(procs: list[Proc], mode: str) -> None:
    demo = Proc("demo", "--dashboard", "--mode", mode, "--epochs", "2", "--runners", "2")
    procs.append(demo)
    url = demo.wait_for_line(r"dashboard: (http://127\.0\.0\.1:\d+/)\s*$").group(1)
    demo.wait_for_line("the dashboard stays up until Ctrl-C")
    children = descendants(demo.popen.pid)
    summary = httpx.get(f"{url}v1/dashboard/summary").json()
    stats = summary["statistics"]
    assert stats["total_rollouts"] > 0 and stats["rollouts"]["succeeded"] == stats["total_rollouts"]
    assert summary["timeline"]["finished_total"] == stats["total_rollouts"]
    rewards = re.search(r"mean reward ([\d.]+) -> ([\d.]+)", demo.output)
    assert rewards is not None
    demo.popen.send_signal(signal.SIGINT)
    assert demo.wait() == 0, demo.output
    assert alive(children) == set()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}v1/dashboard/summary")


@needs_proc
def test_ctrl_c_during_a_demo_with_dashboard_interrupts_the_run(procs: list[Proc]) -> None:
    demo = Proc("demo", "--dashboard", "--epochs", "50", "--latency", "0.2")
    procs.append(demo)
    url = demo.wait_for_line(r"dashboard: (http://127\.0\.0\.1:\d+/)\s*$").group(1)
    assert httpx.get(f"{url}v1/dashboard/summary").status_code == 200  # served during the run
    demo.popen.send_signal(signal.SIGINT)
    assert demo.wait(timeout=30) == 130, demo.output
    assert "stays up" not in demo.output
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}v1/dashboard/summary")

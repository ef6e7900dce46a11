"""Fixtures of the fault scenarios: no process left behind, and the measured figures.

Every scenario here starts real processes and talks over real loopback sockets. The autouse
``no_leftover_processes`` fixture fails a test that leaves any descendant of the test process
running (runners, servers, aiomultiprocess's manager, the resource tracker).

``figures`` records what a scenario measured (times to recover, shutdown durations, requests
tried, errors seen, p99 latency, RSS growth); they are printed in pytest's terminal summary, and
written as JSON lines to the file named by env ``AGL_FAULTS_FIGURES`` when it is set.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

AGL_VARS = ("AGL_CURRENT_ROLE", "AGL_SERVER_HOST", "AGL_SERVER_PORT", "AGL_MANAGED_STORE", "AGL_SERVER_TOKEN")

_FIGURES: list[tuple[str, dict[str, Any]]] = []


@pytest.fixture(autouse=True)
def no_leftover_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in AGL_VARS:
        monkeypatch.delenv(name, raising=False)
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    # A child that has just been killed may need a moment to be reaped by whoever owns it.
    deadline = time.monotonic() + 5.0
    while True:
        left = [p for p in me.children(recursive=True) if p.pid not in before and _alive(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert left == [], f"processes left behind: {[(p.pid, _cmdline(p)) for p in left]}"


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return ["?"]


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``figures(name=value, ...)``: record measured figures of this test (summary + JSON lines)."""

    def record(**values: Any) -> None:
        rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in values.items()}
        _FIGURES.append((request.node.nodeid, rounded))
        for key, value in rounded.items():
            request.node.user_properties.append((key, value))
        path = os.environ.get("AGL_FAULTS_FIGURES")
        if path:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"test": request.node.nodeid, **rounded}) + "\n")

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("fault scenarios: measured figures")
    for nodeid, values in _FIGURES:
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        terminalreporter.write_line(f"{nodeid.split('::', 1)[-1]}: {shown}")

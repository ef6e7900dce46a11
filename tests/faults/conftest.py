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
from collections.abc import Callable
from typing import Any

import pytest

_FIGURES: list[tuple[str, dict[str, Any]]] = []


@pytest.fixture(autouse=True)
def _every_scenario_leaves_no_process(no_leftover_processes: None) -> None:
    """Every scenario gets tests/conftest.py's ``no_leftover_processes`` check."""


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

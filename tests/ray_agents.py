"""An agent for ``agl-async runner --ray`` in tests/test_ray.py (imported by name, by the CLI and
by the Ray actors, from this directory)."""

from __future__ import annotations

from typing import Any


async def double(task: Any, resources: dict[str, Any]) -> float:
    return 2.0 * float(task)

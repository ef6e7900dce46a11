"""Shared fixtures. Tests run under anyio's own pytest plugin (``@pytest.mark.anyio``).

``anyio_backend`` defaults to asyncio; backend-neutral modules (store, shared-memory) override
it with ``BOTH_BACKENDS`` to run on trio as well.
"""

from __future__ import annotations

import pytest

BOTH_BACKENDS = [pytest.param("asyncio", id="asyncio"), pytest.param("trio", id="trio")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"

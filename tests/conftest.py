"""Shared fixtures. Tests run under anyio's own pytest plugin (``@pytest.mark.anyio``).

``anyio_backend`` defaults to asyncio; backend-neutral modules (store, shared-memory) override
it with ``BOTH_BACKENDS`` to run on trio as well.

``store`` is parametrised over every store implementation, so one suite specifies them all:
``memory`` (InMemoryLightningStore), ``locked`` (LightningStoreLocked around it) and ``http``
(LightningStoreClient talking to a LightningStoreServer on 127.0.0.1, asyncio only).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from agl_async import InMemoryLightningStore, LightningStore, LightningStoreLocked

BOTH_BACKENDS = [pytest.param("asyncio", id="asyncio"), pytest.param("trio", id="trio")]
STORE_KINDS = ["memory", "locked", "http"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, anyio_backend: str) -> AsyncIterator[LightningStore]:
    kind = request.param
    if kind == "memory":
        yield InMemoryLightningStore()
    elif kind == "locked":
        yield LightningStoreLocked(InMemoryLightningStore())
    else:
        if anyio_backend != "asyncio":
            pytest.skip("the HTTP store runs on asyncio (uvicorn)")
        from agl_async.testing import serve_store  # the HTTP layer's test helper

        async with serve_store(InMemoryLightningStore()) as client:
            yield client

"""Shared fixtures. Tests run under anyio's own pytest plugin (``@pytest.mark.anyio``).

``anyio_backend`` defaults to asyncio; backend-neutral modules (store, shared-memory) override
it with ``BOTH_BACKENDS`` to run on trio as well.

``store`` is parametrised over every store implementation, so one suite specifies them all:
``memory`` (InMemoryLightningStore), ``locked`` (LightningStoreLocked around it), ``http``
(LightningStoreClient talking to a LightningStoreServer on 127.0.0.1, asyncio only), ``sqlite``
(SqliteLightningStore on a file in a temporary directory), ``http-sqlite`` (the HTTP client in
front of a server over a SqliteLightningStore), ``postgres`` (PostgresLightningStore on a fresh
database of a throwaway cluster, ``postgres_url`` below; asyncio only: skipped on trio saying so,
and skipped when PostgreSQL is not installed) and ``http-postgres``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agl_async import Span
from agl_async.testing import HTTP_KINDS, STORE_KINDS, store_fixture


def _store_methods() -> list[str]:
    from agl_async import LightningStore

    return sorted(
        n for n, f in vars(LightningStore).items() if inspect.iscoroutinefunction(f) and n != "close"
    )


STORE_METHODS = _store_methods()
"""Every coroutine method of the ``LightningStore`` API (``close`` aside)."""


def required_kwargs(method: str) -> dict[str, str]:
    """A placeholder for each required parameter of ``LightningStore.<method>`` (for calls that
    only check where they are forwarded, e.g. to a mock store)."""
    from agl_async import LightningStore

    params = list(inspect.signature(getattr(LightningStore, method)).parameters.values())[1:]
    return {p.name: f"<{p.name}>" for p in params if p.default is p.empty and p.kind in _NAMED}


_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def make_span(rollout_id: str, attempt_id: str, sequence_id: int = 1, **fields: Any) -> Span:
    """A span with every field the contract names set (attribute values of several JSON kinds,
    so that comparisons check they round-trip as values); ``fields`` override any of them."""
    values: dict[str, Any] = {
        "trace_id": "trace",
        "span_id": f"{attempt_id}-{sequence_id}",
        "name": "step",
        "parent_id": None,
        "start_time": 1.0,
        "end_time": 2.0,
        "attributes": {"reward": 0.5, "tags": ["a"], "nested": {"k": None}},
    }
    return Span(rollout_id=rollout_id, attempt_id=attempt_id, sequence_id=sequence_id, **{**values, **fields})


AGL_VARS = ("AGL_CURRENT_ROLE", "AGL_SERVER_HOST", "AGL_SERVER_PORT", "AGL_MANAGED_STORE", "AGL_SERVER_TOKEN")
BOTH_BACKENDS = [pytest.param("asyncio", id="asyncio"), pytest.param("trio", id="trio")]


#: Tests of the store suite that pin a behaviour issue 16 makes wrong for every store; the durable
#: stores implement the issue's rule already, the in-memory store will with issue 16 (which then
#: updates these tests, turning these expected failures into passes: strict, so they get noticed).
ISSUE_16_RULES = {
    # "a rollout in a terminal status never changes status afterwards": the test revives a
    # rollout the watchdog had failed (max_attempts=1) with a late span.
    "test_unresponsive_attempt_comes_back_with_a_span": "a terminal rollout never changes (issue 16)",
}
DURABLE_KINDS = frozenset({"sqlite", "http-sqlite", "postgres", "http-postgres"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The HTTP store runs on asyncio only (uvicorn): drop the trio x HTTP combinations of the
    store suite at collection instead of reporting dozens of skips. Mark the durable stores'
    runs of :data:`ISSUE_16_RULES` as expected failures."""
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        kind = params.get("store")
        if kind in DURABLE_KINDS and getattr(item, "originalname", None) in ISSUE_16_RULES:
            reason = ISSUE_16_RULES[item.originalname]  # type: ignore[attr-defined]
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
        (drop if kind in HTTP_KINDS and params.get("anyio_backend") == "trio" else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


#: Every store implementation, one suite for all (``agl_async.testing`` makes the fixture).
store = store_fixture(*STORE_KINDS)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """A throwaway PostgreSQL cluster for the whole session (tests/throwaway_postgres.py), started
    by the first test that needs it; skips that test, saying why, when PostgreSQL is not installed."""
    from throwaway_postgres import PostgresCluster, skip_reason

    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def postgres_url(pg_cluster: Any) -> str:
    """The server the ``postgres`` store kinds make their fresh databases on (agl_async.testing)."""
    return str(pg_cluster.dsn())


@pytest.fixture
def pg_dsn(pg_cluster: Any) -> str:
    """The DSN of a fresh, empty database on the session's cluster."""
    return str(pg_cluster.create_database())


def _alive(process: object) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE  # type: ignore[attr-defined, no-any-return]
    except psutil.NoSuchProcess:
        return False


def _cmdline(process: object) -> list[str]:
    import psutil

    try:
        return process.cmdline()  # type: ignore[attr-defined, no-any-return]
    except psutil.Error:
        return ["?"]


@pytest.fixture
def no_leftover_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail a test that leaves a descendant process running (runners, servers, the algorithm
    child, aiomultiprocess's manager, the resource tracker). Also clears the ``AGL_*`` variables
    so the strategies see only what the test sets. A child that has just been killed gets a few
    seconds to be reaped by whoever owns it."""
    import aiomultiprocess.core
    import psutil

    for name in AGL_VARS:
        monkeypatch.delenv(name, raising=False)
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    manager_before = aiomultiprocess.core._manager
    yield
    deadline = time.monotonic() + 5.0
    while True:
        left = [p for p in me.children(recursive=True) if p.pid not in before and _alive(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert left == [], f"processes left behind: {[(p.pid, _cmdline(p)) for p in left]}"
    if manager_before is None:
        assert aiomultiprocess.core._manager is None, "aiomultiprocess's manager was left running"


# ---------------------------------------------------------------------------- TLS (trustme)
class TLSFiles:
    """PEM files of a throwaway CA (``trustme``) and a server certificate it signed.

    ``ca``: the CA certificate (what a client passes as ``verify=``); ``cert`` / ``key``: the
    server's certificate chain and private key; ``combined``: both in one file; ``other_ca``: a
    CA that signed nothing here (a client trusting only it must refuse the server)."""

    def __init__(self, directory: Any, *names: str) -> None:
        import trustme

        ca, other = trustme.CA(), trustme.CA()
        issued = ca.issue_cert(*(names or ("127.0.0.1", "localhost", "::1")))
        self.ca = directory / "ca.pem"
        self.other_ca = directory / "other-ca.pem"
        self.cert = directory / "server.pem"
        self.key = directory / "server.key"
        self.combined = directory / "server-and-key.pem"
        ca.cert_pem.write_to_path(str(self.ca))
        other.cert_pem.write_to_path(str(self.other_ca))
        issued.private_key_pem.write_to_path(str(self.key))
        issued.private_key_and_cert_chain_pem.write_to_path(str(self.combined))
        with open(self.cert, "wb") as f:
            for blob in issued.cert_chain_pems:
                f.write(blob.bytes())


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost / ::1 (session-wide)."""
    return TLSFiles(tmp_path_factory.mktemp("tls"))

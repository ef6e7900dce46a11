"""TLS between LightningStoreClient and LightningStoreServer, with a throwaway CA (trustme).

Specified here: HTTPS works end to end (positional and keyword ``verify``, a CA path, a context,
``False``); a client that does not trust the server's CA, an https client against a plain port,
and a plain client against the TLS port each fail at once with one ``StoreTLSError`` naming the
endpoint (no retry budget spent), and the server keeps serving; ``verify`` is checked when the
client is made; a client with a CA path pickles into a spawned process and works there, one with
an ``SSLContext`` refuses to pickle with a clear error; the client-server strategy's runner
processes reach an HTTPS, token-protected server with what the strategy gave them.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import pickle
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest
from conftest import TLSFiles

from agl_async import (
    ClientServerExecutionStrategy,
    InMemoryLightningStore,
    LightningStoreClient,
    LightningStoreServer,
)
from agl_async.http.client import StoreConnectionError, StoreTLSError

pytestmark = pytest.mark.anyio

#: A retry budget far longer than any test bound: a test that finishes quickly did not retry.
LONG_RETRIES = (5.0, 5.0, 5.0)


@asynccontextmanager
async def tls_server(tls: TLSFiles, **kwargs: object) -> AsyncIterator[LightningStoreServer]:
    async with LightningStoreServer(
        InMemoryLightningStore(),
        "127.0.0.1",
        0,
        ssl_certfile=str(tls.cert),
        ssl_keyfile=str(tls.key),
        **{"auth_token": "", **kwargs},  # type: ignore[arg-type]
    ) as server:
        yield server


async def test_https_round_trip_with_the_ca_as_verify(tls_files: TLSFiles) -> None:
    async with tls_server(tls_files) as server:
        assert server.endpoint.startswith("https://127.0.0.1:")
        async with LightningStoreClient(server.endpoint, "", str(tls_files.ca)) as client:
            rollout = await client.enqueue_rollout({"x": 1})
            claimed = await client.dequeue_rollout(worker_id="w")
            assert claimed is not None and claimed.rollout_id == rollout.rollout_id
            assert await client.health()
        context = ssl.create_default_context(cafile=str(tls_files.ca))
        async with LightningStoreClient(server.endpoint, auth_token="", verify=context) as client:
            assert (await client.statistics())["total_rollouts"] == 1
        async with LightningStoreClient(server.endpoint, auth_token="", verify=Path(tls_files.ca)) as client:
            assert (await client.statistics())["total_rollouts"] == 1
        async with LightningStoreClient(server.endpoint, auth_token="", verify=False) as client:
            assert (await client.statistics())["total_rollouts"] == 1


async def test_the_key_may_sit_in_the_certificate_file(tls_files: TLSFiles) -> None:
    async with LightningStoreServer(
        InMemoryLightningStore(), "127.0.0.1", 0, auth_token="", ssl_certfile=tls_files.combined
    ) as server:
        async with LightningStoreClient(server.endpoint, "", tls_files.ca) as client:
            assert (await client.statistics())["total_rollouts"] == 0


@pytest.mark.parametrize("trust", ["system", "other_ca"])
async def test_an_untrusted_certificate_fails_at_once_naming_the_endpoint(
    tls_files: TLSFiles, trust: str
) -> None:
    verify = True if trust == "system" else str(tls_files.other_ca)
    async with tls_server(tls_files) as server:
        client = LightningStoreClient(server.endpoint, "", verify, retry_delays=LONG_RETRIES)
        started = time.monotonic()
        with anyio.fail_after(4), pytest.raises(StoreTLSError) as info:
            await client.enqueue_rollout("never stored")
        assert time.monotonic() - started < 2.0  # no retry (the first delay alone is 5 s)
        message = str(info.value)
        assert server.endpoint in message and "certificate" in message and "--ca-file" in message
        assert isinstance(info.value, StoreConnectionError)
        await client.close()
        # nothing was applied, and the server still serves a client that trusts its CA
        async with LightningStoreClient(server.endpoint, "", tls_files.ca) as good:
            assert (await good.statistics())["total_rollouts"] == 0


async def test_plain_http_to_the_tls_port_is_a_clear_error_and_the_server_lives_on(
    tls_files: TLSFiles,
) -> None:
    async with tls_server(tls_files) as server:
        plain = server.endpoint.replace("https://", "http://")
        client = LightningStoreClient(plain, "", retry_delays=LONG_RETRIES)
        started = time.monotonic()
        with anyio.fail_after(4), pytest.raises(StoreTLSError) as info:
            await client.statistics()
        assert time.monotonic() - started < 2.0
        assert plain in str(info.value) and f"use {server.endpoint}" in str(info.value)
        await client.close()
        async with LightningStoreClient(server.endpoint, "", tls_files.ca) as good:
            await good.enqueue_rollout("still serving")
            assert (await good.statistics())["total_rollouts"] == 1


async def test_https_to_a_plain_port_is_a_clear_error(tls_files: TLSFiles) -> None:
    async with LightningStoreServer(InMemoryLightningStore(), "127.0.0.1", 0, auth_token="") as server:
        https = server.endpoint.replace("http://", "https://")
        client = LightningStoreClient(https, "", tls_files.ca, retry_delays=LONG_RETRIES)
        with anyio.fail_after(4), pytest.raises(StoreTLSError, match="does not speak TLS") as info:
            await client.statistics()
        assert https in str(info.value)
        await client.close()


async def test_a_server_that_went_away_is_still_retried_not_taken_for_tls(tls_files: TLSFiles) -> None:
    """The TLS probe of a failed plain request must not turn an ordinary outage into a TLS error."""
    async with LightningStoreServer(InMemoryLightningStore(), "127.0.0.1", 0, auth_token="") as server:
        endpoint = server.endpoint
    client = LightningStoreClient(endpoint, "", retry_delays=(0.01, 0.01))
    with anyio.fail_after(10), pytest.raises(StoreConnectionError, match="3 tries") as info:
        await client.statistics()
    assert not isinstance(info.value, StoreTLSError)


def test_verify_is_checked_when_the_client_is_made(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        LightningStoreClient("https://127.0.0.1:1", "", str(tmp_path / "missing.pem"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="cannot load CA bundle"):
        LightningStoreClient("https://127.0.0.1:1", "", str(garbage))
    with pytest.raises(ValueError, match="verify must be"):
        LightningStoreClient("https://127.0.0.1:1", "", 3)  # type: ignore[arg-type]


def test_a_client_with_an_ssl_context_refuses_to_pickle_saying_what_to_do(tls_files: TLSFiles) -> None:
    context = ssl.create_default_context(cafile=str(tls_files.ca))
    client = LightningStoreClient("https://127.0.0.1:4747", "", context)
    with pytest.raises(TypeError, match="CA bundle path"):
        pickle.dumps(client)
    copy = pickle.loads(pickle.dumps(LightningStoreClient("https://127.0.0.1:4747", "t", str(tls_files.ca))))
    assert copy.verify == str(tls_files.ca) and copy.auth_token == "t"


def _child(client: LightningStoreClient) -> None:
    async def main() -> None:
        async with client:
            claimed = await client.dequeue_rollout(worker_id="child", timeout=30)
            assert claimed is not None
            await client.update_attempt(claimed.rollout_id, claimed.attempt.attempt_id, status="succeeded")

    asyncio.run(main())


async def test_a_client_with_a_ca_path_works_in_a_spawned_process(tls_files: TLSFiles) -> None:
    async with tls_server(tls_files, auth_token="tls-token") as server:
        client = LightningStoreClient(server.endpoint, "tls-token", str(tls_files.ca))
        rollout = await client.enqueue_rollout("for the child")
        proc = multiprocessing.get_context("spawn").Process(target=_child, args=(client,))
        proc.start()
        try:
            with anyio.fail_after(120):
                done = await client.wait_for_rollouts(rollout_ids=[rollout.rollout_id], timeout=None)
                await anyio.to_thread.run_sync(proc.join, 60)
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join()
        assert proc.exitcode == 0 and [r.status for r in done] == ["succeeded"]
        await client.close()


# --------------------------------------------------------------------------- the strategy
@pytest.mark.usefixtures("no_leftover_processes")
async def test_strategy_runner_processes_reach_an_https_server_with_a_token(tls_files: TLSFiles) -> None:
    import bundles

    strategy = ClientServerExecutionStrategy(
        role="both",
        server_host="127.0.0.1",
        server_port=0,
        n_runners=2,
        auth_token="strategy-token",
        ssl_certfile=tls_files.cert,
        ssl_keyfile=tls_files.key,
        verify=str(tls_files.ca),
        graceful_timeout=5,
    )
    assert strategy.tls and "strategy-token" not in repr(strategy)
    store = InMemoryLightningStore()
    with anyio.fail_after(120):
        await strategy.execute(bundles.algorithm_enqueueing(6), bundles.runner_processes, store)
    rollouts = await store.query_rollouts()
    assert rollouts and all(r.status == "succeeded" for r in rollouts)


def _ssl_error(cls: type[ssl.SSLError], reason: str | None) -> ssl.SSLError:
    error = cls(1, f"[SSL: {reason}] ...")
    if reason is not None:
        error.reason = reason
    return error


@pytest.mark.parametrize(
    ("error", "permanent"),
    [
        (_ssl_error(ssl.SSLCertVerificationError, "CERTIFICATE_VERIFY_FAILED"), True),
        (_ssl_error(ssl.SSLError, "WRONG_VERSION_NUMBER"), True),
        (_ssl_error(ssl.SSLError, "TLSV1_ALERT_UNKNOWN_CA"), True),
        # a handshake cut short or timed out (an outage, a restarting server): retried
        (ssl.SSLWantReadError(2, "The operation did not complete (read)"), False),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), False),
        (ssl.SSLSyscallError(5, "syscall"), False),
        (_ssl_error(ssl.SSLError, "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"), False),
        (ConnectionResetError(104, "reset"), False),
    ],
)
def test_only_misconfigurations_are_tls_errors_that_skip_the_retries(
    error: BaseException, permanent: bool
) -> None:
    """A TLS error that a network outage can cause must be retried like any outage (a runner host
    whose link is cut mid-handshake must not give up at once); a misconfiguration must not."""
    from agl_async.http._tls import describe_tls_failure

    wrapped = httpx.ConnectError(str(error))
    wrapped.__cause__ = error
    assert (describe_tls_failure(wrapped) is not None) is permanent

"""Secure by default: no unauthenticated store on a network-facing address, tokens from files,
certificates checked up front, tokens never shown.

Specified here, in the API and on the command line: binding an address that is not loopback
without a token is refused (``ValueError`` / exit code 2, naming the host and the ways out) unless
opted out (``allow_unauthenticated=True`` / ``--insecure``); ``--token-file`` (a missing or empty
file is exit code 2, the trailing newline is not part of the token, ``--token`` and
``--token-file`` exclude each other); ``--ca-file`` only with ``https://``; a certificate or key
that cannot be loaded is a ``ValueError`` naming it before anything binds; and the token appears
in no log record, ``repr`` or output, even at DEBUG.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from conftest import TLSFiles

from agl_async import (
    ClientServerExecutionStrategy,
    InMemoryLightningStore,
    LightningStoreClient,
    LightningStoreServer,
)
from agl_async.cli import main
from agl_async.http.client import StoreAuthError
from agl_async.testing import free_port

TOKEN = "tok-3f9a1c7e-never-shown"
TIMEOUT = 120  # hang guard only


def cli(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agl_async.cli", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        **kwargs,  # type: ignore[call-overload]
    )


# --------------------------------------------------------------------------- the refusal, API
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "192.168.0.7", "store.example"])
def test_a_network_facing_address_without_a_token_is_refused(
    host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGL_SERVER_TOKEN", raising=False)
    for token in (None, ""):
        with pytest.raises(ValueError) as info:
            LightningStoreServer(InMemoryLightningStore(), host, 0, auth_token=token)
        message = str(info.value)
        assert repr(host) in message
        for way_out in ("auth_token", "AGL_SERVER_TOKEN", "allow_unauthenticated"):
            assert way_out in message


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3"])
def test_a_token_or_the_explicit_opt_out_lets_it_serve(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGL_SERVER_TOKEN", raising=False)
    LightningStoreServer(InMemoryLightningStore(), host, 0, auth_token=TOKEN)
    LightningStoreServer(InMemoryLightningStore(), host, 0, allow_unauthenticated=True)
    monkeypatch.setenv("AGL_SERVER_TOKEN", TOKEN)
    assert LightningStoreServer(InMemoryLightningStore(), host, 0).auth_token == TOKEN


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "localhost", "::1"])
def test_loopback_needs_no_token(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGL_SERVER_TOKEN", raising=False)
    LightningStoreServer(InMemoryLightningStore(), host, 0)


def test_allow_unauthenticated_must_be_a_boolean() -> None:
    with pytest.raises(ValueError, match="allow_unauthenticated"):
        LightningStoreServer(InMemoryLightningStore(), "0.0.0.0", 0, allow_unauthenticated="yes")  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.usefixtures("no_leftover_processes")
async def test_the_strategy_refuses_before_starting_anything() -> None:
    import bundles

    strategy = ClientServerExecutionStrategy(role="both", server_host="0.0.0.0", server_port=0, n_runners=2)
    store = InMemoryLightningStore()
    with anyio.fail_after(30), pytest.raises(ValueError, match="allow_unauthenticated"):
        await strategy.execute(bundles.algorithm_enqueueing(1), bundles.runner_processes, store)


# --------------------------------------------------------------------------- certificates
def test_certificate_problems_are_value_errors_naming_the_file(tls_files: TLSFiles, tmp_path: Path) -> None:
    store = InMemoryLightningStore()
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match=r"missing\.pem"):
        LightningStoreServer(store, "127.0.0.1", 0, ssl_certfile=missing)
    with pytest.raises(ValueError, match=r"missing\.pem"):
        LightningStoreServer(store, "127.0.0.1", 0, ssl_certfile=tls_files.cert, ssl_keyfile=missing)
    with pytest.raises(ValueError, match=r"server\.pem"):  # a certificate without its key
        LightningStoreServer(store, "127.0.0.1", 0, ssl_certfile=tls_files.cert)
    with pytest.raises(ValueError, match="needs ssl_certfile"):
        LightningStoreServer(store, "127.0.0.1", 0, ssl_keyfile=tls_files.key)
    other = TLSFiles(tmp_path, "127.0.0.1")  # a key that belongs to another certificate
    with pytest.raises(ValueError, match="cannot load"):
        LightningStoreServer(store, "127.0.0.1", 0, ssl_certfile=tls_files.cert, ssl_keyfile=other.key)


# --------------------------------------------------------------------------- tokens never shown
@pytest.mark.anyio
async def test_the_token_is_in_no_log_record_or_repr(
    caplog: pytest.LogCaptureFixture, tls_files: TLSFiles
) -> None:
    with caplog.at_level(logging.DEBUG):  # every logger: ours, uvicorn's, httpx's, httpcore's
        server = LightningStoreServer(
            InMemoryLightningStore(), "127.0.0.1", 0, auth_token=TOKEN, ssl_certfile=tls_files.combined
        )
        async with server:
            async with LightningStoreClient(server.endpoint, TOKEN, str(tls_files.ca)) as client:
                await client.enqueue_rollout("x")
                claimed = await client.dequeue_rollout(worker_id="w")
                assert claimed is not None
            async with LightningStoreClient(server.endpoint, TOKEN + "-wrong", str(tls_files.ca)) as client:
                with pytest.raises(StoreAuthError):
                    await client.statistics()
        strategy = ClientServerExecutionStrategy(role="runner", auth_token=TOKEN, verify=str(tls_files.ca))
        shown = [repr(server), repr(client), repr(strategy), repr(strategy._transport)]
    records = [r.getMessage() + repr(r.args) + str(r.exc_info) for r in caplog.records]
    assert records  # DEBUG logging did record the exchange
    assert not [text for text in records + shown if TOKEN in text]


# --------------------------------------------------------------------------- command line
def test_serve_refuses_a_network_facing_address_without_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AGL_SERVER_TOKEN"}
    result = cli("serve", "--host", "0.0.0.0", "--port", str(free_port()), env=env)
    assert result.returncode == 2, result.stderr
    for hint in ("'0.0.0.0'", "--token-file", "AGL_SERVER_TOKEN", "--insecure"):
        assert hint in result.stderr
    assert "Traceback" not in result.stderr and "listening" not in result.stdout


def test_insecure_opts_out(tmp_path: Path) -> None:
    """``--insecure`` on a non-loopback address serves. Run inside a fresh network namespace (only
    its loopback device exists, so nothing else can reach the server), which needs root."""
    from faults.netns import unavailable

    reason = unavailable()
    if reason:
        pytest.skip(f"serving a non-loopback address is done inside a network namespace: {reason}")
    ns = f"agl-insecure-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, timeout=30)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("AGL_SERVER_TOKEN", None)
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "agl_async.cli", "serve"]
        argv += ["--host", "0.0.0.0", "--port", "4747", "--insecure"]
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "listening on http://127.0.0.1:4747" in line, (line, proc.stderr)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=30)


@pytest.mark.parametrize("command", ["serve", "runner"])
def test_a_missing_or_empty_token_file_is_a_usage_error(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ["--server", "http://127.0.0.1:1", "--agent", "x:y"] if command == "runner" else []
    missing = tmp_path / "no-such-token"
    assert main([command, *extra, "--token-file", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "cannot read --token-file" in err and "no-such-token" in err
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert main([command, *extra, "--token-file", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # one or the other
        main([command, *extra, "--token-file", str(empty), "--token", "x"])
    assert info.value.code == 2


def test_runner_ca_file_needs_https_and_must_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert main(["runner", "--server", "http://127.0.0.1:1", "--agent", "x:y", "--ca-file", str(ca)]) == 2
    assert "https://" in capsys.readouterr().err
    missing = str(tmp_path / "nope.pem")
    assert main(["runner", "--server", "https://127.0.0.1:1", "--agent", "x:y", "--ca-file", missing]) == 2
    assert "nope.pem" in capsys.readouterr().err


def test_serve_keyfile_needs_certfile(tls_files: TLSFiles, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--ssl-keyfile", str(tls_files.key)]) == 2
    assert "--ssl-certfile" in capsys.readouterr().err


def test_token_file_with_trailing_newline_over_https_and_nothing_shows_the_token(
    tmp_path: Path, tls_files: TLSFiles
) -> None:
    """``serve --token-file`` (the file ends in a newline) over HTTPS, a client with the bare
    token, and ``runner --token-file --ca-file`` attached; at DEBUG, neither process prints the
    token, and neither command line holds it."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "AGL_SERVER_TOKEN"}
    env["PYTHONUNBUFFERED"] = "1"
    common = ["--log-level", "DEBUG"]
    serve_argv = [sys.executable, "-m", "agl_async.cli", *common, "serve", "--port", str(port)]
    serve_argv += ["--token-file", str(token_file), "--ssl-certfile", str(tls_files.cert)]
    serve_argv += ["--ssl-keyfile", str(tls_files.key)]
    server = subprocess.Popen(serve_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    runner = None
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        endpoint = f"https://127.0.0.1:{port}"
        assert f"listening on {endpoint} (bearer token required)" in line, line

        async def use() -> None:
            async with LightningStoreClient(endpoint, TOKEN, str(tls_files.ca)) as client:
                await client.add_resources({"theta": [0.5]})
                await client.enqueue_many_rollouts([{"input": {"x": [1.0], "y": 1.0}} for _ in range(3)])
                with anyio.fail_after(TIMEOUT):
                    # the state of another process: polled
                    while (await client.statistics())["rollouts"].get("succeeded", 0) < 3:  # noqa: ASYNC110
                        await anyio.sleep(0.1)

        runner_argv = [sys.executable, "-m", "agl_async.cli", *common, "runner", "--server", endpoint]
        runner_argv += ["--ca-file", str(tls_files.ca), "--token-file", str(token_file)]
        runner_argv += ["--agent", "agl_async.examples.evolution:agent", "-n", "2"]
        runner = subprocess.Popen(
            runner_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        anyio.run(use)
        runner.send_signal(signal.SIGINT)
        r_out, r_err = runner.communicate(timeout=TIMEOUT)
        assert runner.returncode == 130, r_err
        server.send_signal(signal.SIGINT)
        s_out, s_err = server.communicate(timeout=TIMEOUT)
        assert server.returncode == 0, s_err
    finally:
        for proc in (server, runner):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert "DEBUG" in r_err + s_err  # it did log at DEBUG
    for text in (line, s_out, s_err, r_out, r_err, " ".join(serve_argv), " ".join(runner_argv)):
        assert TOKEN not in text

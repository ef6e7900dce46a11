"""Developer tasks: ``nox -s tests lint typecheck docs bench bench_compare bench_production faults ray``."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

PEER_VENV = os.path.join(".nox", "agentlightning-0.3.0")


@nox.session
def tests(session: nox.Session) -> None:
    """The default test session: everything but the slow load soak (``-m 'not slow'``)."""
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "not slow", *session.posargs)


@nox.session
def faults(session: nox.Session) -> None:
    """Fault and load scenarios, including the slow soak."""
    session.install("-e", ".[test]")
    session.run("pytest", "tests/faults", *session.posargs)


@nox.session
def ray(session: nox.Session) -> None:
    """The Ray fleet tests (``-m ray``: a local Ray cluster, about a minute); the ``ray`` extra is
    installed here only, so ``tests`` skips them."""
    session.install("-e", ".[test,ray]")
    session.run("pytest", "-m", "ray", "-p", "no:cacheprovider", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "agl_async", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "agl_async", "tests", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[test]", "mypy")
    session.run("mypy", "--strict", "agl_async")


@nox.session
def docs(session: nox.Session) -> None:
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", "--site-dir", os.path.join(session.create_tmp(), "site"))


@nox.session
def bench(session: nox.Session) -> None:
    """Every benchmark in benchmarks/ on agl_async alone: JSON + Markdown in benchmarks/results/,
    docs/performance.md re-rendered. ``nox -s bench -- --quick`` for a smoke test."""
    session.install("-e", ".")
    session.run("python", "benchmarks/report.py", "--no-peer", "--extras", *session.posargs)


#: OpenTelemetry as Agent-Lightning 0.3.0 needs it: with 1.45 its OTLP exporter loses the agent's
#: spans (docs/performance.md; the production benchmark checks every rollout's spans).
PEER_PINS = [
    "opentelemetry-api==1.44.0",
    "opentelemetry-sdk==1.44.0",
    "opentelemetry-exporter-otlp==1.44.0",
    "opentelemetry-exporter-otlp-proto-http==1.44.0",
    "opentelemetry-exporter-otlp-proto-grpc==1.44.0",
    "opentelemetry-exporter-otlp-proto-common==1.44.0",
    "opentelemetry-proto==1.44.0",
    "opentelemetry-semantic-conventions==0.65b0",
    "opentelemetry-instrumentation==0.65b0",
]
PEER_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # else its import retries a download for seconds


def _peer_python(session: nox.Session) -> str:
    """Agent-Lightning 0.3.0's interpreter: ``AGL_PEER_PYTHON``, else ``.nox/agentlightning-0.3.0``
    (made on first use with ``pip install agentlightning==0.3.0`` and the OpenTelemetry pins)."""
    if os.environ.get("AGL_PEER_PYTHON"):
        return os.environ["AGL_PEER_PYTHON"]
    peer_python = os.path.abspath(os.path.join(PEER_VENV, "bin", "python"))
    check = (
        "import importlib.metadata as m; "
        "print('have', m.version('agentlightning'), m.version('opentelemetry-sdk'))"
    )
    have = os.path.exists(peer_python) and session.run(
        peer_python, "-c", check, external=True, silent=True, success_codes=[0, 1], env=PEER_ENV
    )
    if not (isinstance(have, str) and "have 0.3.0 1.44.0" in have):
        session.run("python", "-m", "venv", "--clear", PEER_VENV)
        pip = [peer_python, "-m", "pip", "install", "-q"]
        session.run(*pip, "agentlightning==0.3.0", external=True, env=PEER_ENV)
        session.run(*pip, *PEER_PINS, external=True, env=PEER_ENV)
    return peer_python


@nox.session
def bench_compare(session: nox.Session) -> None:
    """``bench`` side by side with Agent-Lightning 0.3.0 (same workloads, interleaved A B A B).

    The peer runs in its own venv (see :func:`_peer_python`); it is never imported into this
    session's venv."""
    session.install("-e", ".")
    peer_python = _peer_python(session)
    session.run(
        "python", "benchmarks/report.py", "--peer", peer_python, "--extras", *session.posargs, env=PEER_ENV
    )


@nox.session
def bench_production(session: nox.Session) -> None:
    """Agent-Lightning's production store workloads on both systems (``benchmarks/production.py
    --scan``: about an hour on 2 cores; ``nox -s bench_production -- --quick``: under 3 minutes),
    then docs/performance.md re-rendered with them. Our agent writes its spans with OpenTelemetry
    (the ``otel`` extra), as Agent-Lightning's does."""
    session.install("-e", ".[otel]")
    peer_python = _peer_python(session)
    session.run(
        "python", "benchmarks/production.py", "--scan", "--peer", peer_python, *session.posargs, env=PEER_ENV
    )
    if "--quick" not in session.posargs:
        session.run("python", "benchmarks/report.py", "--docs-only")

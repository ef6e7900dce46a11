"""Developer tasks: ``nox -s tests lint typecheck docs bench bench_compare faults ray``."""

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


@nox.session
def bench_compare(session: nox.Session) -> None:
    """``bench`` side by side with Agent-Lightning 0.3.0 (same workloads, interleaved A B A B).

    The peer runs in its own venv, ``.nox/agentlightning-0.3.0`` (made with ``pip install
    agentlightning==0.3.0`` on first use, reused afterwards), or the interpreter named by
    ``AGL_PEER_PYTHON`` when that is set. It is never imported into this session's venv."""
    session.install("-e", ".")
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # else its import retries a download for seconds
    peer_python = os.environ.get("AGL_PEER_PYTHON") or os.path.abspath(
        os.path.join(PEER_VENV, "bin", "python")
    )
    if not os.environ.get("AGL_PEER_PYTHON"):
        check = "import importlib.metadata as m; print('have', m.version('agentlightning'))"
        have = os.path.exists(peer_python) and session.run(
            peer_python, "-c", check, external=True, silent=True, success_codes=[0, 1], env=env
        )
        if not (isinstance(have, str) and "have 0.3.0" in have):
            session.run("python", "-m", "venv", "--clear", PEER_VENV)
            session.run(
                peer_python, "-m", "pip", "install", "-q", "agentlightning==0.3.0", external=True, env=env
            )
    session.run(
        "python", "benchmarks/report.py", "--peer", peer_python, "--extras", *session.posargs, env=env
    )

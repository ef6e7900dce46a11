"""Developer tasks: ``nox -s tests lint typecheck docs bench bench_compare faults``."""

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

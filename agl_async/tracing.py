"""The runner's tracer: the OpenTelemetry spans an agent starts become Spans of its attempt.

With ``opentelemetry-sdk`` installed (``pip install "agl-async[otel]"``), the runner loop wraps
each agent call in :func:`trace_attempt`. Every span that the agent's code starts during the call
through the global ``opentelemetry.trace`` API — its own ``tracer.start_as_current_span(...)`` or
an instrumentation library's (``opentelemetry-instrumentation-httpx``, the OpenAI
instrumentations, …) — is stored as a :class:`~agl_async.Span` of that attempt once it ends.

Which attempt
    A context variable set around the agent call names it, so the answer is right with many
    rollouts in flight in one process: each agent call runs in its own task, tasks the agent
    starts inherit the context, and so do synchronous agents (the runner runs them with
    ``anyio.to_thread.run_sync``, which copies the context into the worker thread). A span started
    where the variable is not set (a thread the agent started by hand) still belongs to the
    attempt when its parent span does (OpenTelemetry context propagated into the thread).

The provider
    The tracer is a span processor. If the application installed an SDK ``TracerProvider``, the
    processor is added to it (its exporters and sampler stay as they are: spans the sampler drops
    are not recorded); if none is installed, the runner installs a plain one the first time an
    agent runs. OpenTelemetry lets a process set its provider only once, so an application that
    wants its own must set it before the first rollout starts. A provider that is not the SDK's
    cannot take the processor: a warning says so and spans are not recorded. Setting the
    environment variable ``AGL_AGENT_TRACING=false`` turns the tracer off. Without the SDK
    nothing of OpenTelemetry is imported and the agent call is not wrapped.

When spans reach the store
    Spans are kept in memory while the agent runs and written when the call returns (or raises),
    before the runner marks the attempt succeeded or failed: by the time ``wait_for_rollouts``
    reports the rollout, ``query_spans`` returns every span the agent ended. They are written with
    ``add_many_spans`` in batches of :data:`BATCH_SIZE` (one HTTP request each in client-server
    mode), numbered by the store in the order they ended. The runner's own store traffic is made
    with OpenTelemetry instrumentation suppressed, so an instrumented HTTP client does not trace it.

Cancellation
    When the agent call is cancelled (the grace period after a stop is over, Ctrl-C) the spans
    ended so far are written under a shielded scope for at most :data:`CANCEL_FLUSH_TIMEOUT`
    seconds before the cancellation goes on. A span that ends after its call returned (a
    background task the agent left running) is written with the next batch the runner writes to
    the same store.
"""

from __future__ import annotations

import logging
import os
import threading
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING

import anyio

from .store.base import LightningStore

if TYPE_CHECKING:
    from ._span_processor import AttemptSpanProcessor, AttemptSpans

__all__ = [
    "BATCH_SIZE",
    "CANCEL_FLUSH_TIMEOUT",
    "TRACING_ENV",
    "current_attempt",
    "trace_attempt",
    "tracing_enabled",
]

logger = logging.getLogger(__name__)

#: Most spans written by one ``add_many_spans`` call (a batch refused as too large is split).
BATCH_SIZE = 512
#: Seconds the spans of a cancelled agent call may take to be written (shielded).
CANCEL_FLUSH_TIMEOUT = 5.0
#: Environment variable that turns the runner's tracer off when false (``0``, ``false``, ``no``, ``off``).
TRACING_ENV = "AGL_AGENT_TRACING"

#: The attempt whose agent call is running in this context (``None`` outside agent calls).
_CURRENT: ContextVar[AttemptSpans | None] = ContextVar("agl_async.tracing.attempt", default=None)

_lock = threading.Lock()
_checked = False
_processor: AttemptSpanProcessor | None = None


def _processor_or_none() -> AttemptSpanProcessor | None:
    """The process's span processor, installed on first use; ``None`` when tracing is off."""
    global _checked, _processor
    if _checked:
        return _processor
    with _lock:
        if not _checked:
            _processor = _install()
            _checked = True
    return _processor


def _install() -> AttemptSpanProcessor | None:
    if os.environ.get(TRACING_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return None
    import importlib.util

    try:  # look without importing: without the SDK nothing of OpenTelemetry is loaded
        for name in ("opentelemetry", "opentelemetry.sdk"):
            if importlib.util.find_spec(name) is None:
                return None
    except (ImportError, ValueError):
        return None
    from ._span_processor import install_processor

    return install_processor()


def tracing_enabled() -> bool:
    """Whether the runner records agents' OpenTelemetry spans in this process (the SDK is
    installed, the tracer is not turned off and the global provider is the SDK's). The first call
    installs the tracer (and a ``TracerProvider`` when the application set none)."""
    return _processor_or_none() is not None


def current_attempt() -> tuple[str, str] | None:
    """``(rollout_id, attempt_id)`` of the agent call running in this context, else ``None``."""
    spans = _CURRENT.get()
    return None if spans is None else (spans.rollout_id, spans.attempt_id)


class _Untraced:
    """The agent call without a tracer: nothing to do."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


_UNTRACED = _Untraced()


class _Traced:
    """Records the spans started in its body as spans of one attempt; writes them on exit."""

    __slots__ = ("_spans", "_token")

    def __init__(self, spans: AttemptSpans) -> None:
        self._spans = spans

    async def __aenter__(self) -> None:
        self._token = _CURRENT.set(self._spans)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _CURRENT.reset(self._token)
        if exc is None or isinstance(exc, Exception):
            await self._spans.close_and_flush()
            return
        # Cancelled or interrupted: write what has ended, shielded and bounded, then let it go on.
        with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_FLUSH_TIMEOUT) as scope:
            await self._spans.close_and_flush()
        if scope.cancelled_caught:
            logger.warning(
                "spans of attempt %s were not all written within %.0f s of its cancellation",
                self._spans.attempt_id,
                CANCEL_FLUSH_TIMEOUT,
            )


def trace_attempt(store: LightningStore, rollout_id: str, attempt_id: str) -> _Traced | _Untraced:
    """An async context manager for the runner loop to wrap an agent call with: the spans the
    body starts become spans of ``attempt_id`` of ``rollout_id`` in ``store``, written before the
    ``async with`` block is left (see the module docstring). Without the SDK (or with the tracer
    off) it does nothing. Errors of the store while writing are logged, not raised."""
    processor = _processor_or_none()
    if processor is None:
        return _UNTRACED
    return _Traced(processor.attempt(store, rollout_id, attempt_id))

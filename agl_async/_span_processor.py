"""The OpenTelemetry SDK half of :mod:`agl_async.tracing` (imported only when the SDK is installed).

:class:`AttemptSpanProcessor` is a span processor added to the process's SDK ``TracerProvider``:
a span started while an agent call runs (``agl_async.tracing._CURRENT`` set) is collected by that
call's :class:`AttemptSpans` when it ends; :meth:`AttemptSpans.close_and_flush` converts the
collected spans with :func:`to_span` and writes them to the store.

Thread safety: ``on_start`` / ``on_end`` run in whatever thread starts or ends a span (the event
loop, a synchronous agent's worker thread); collecting is guarded by a lock per attempt, the
span-id map relies on dict operations being atomic.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Span as SDKSpan
from opentelemetry.trace import StatusCode

from . import tracing
from .store.base import LightningStore
from .types import AUTO_SEQUENCE_ID, Span

__all__ = ["AttemptSpanProcessor", "AttemptSpans", "install_processor", "to_span"]

logger = logging.getLogger("agl_async.tracing")

_UNSET, _OK = StatusCode.UNSET, StatusCode.OK
# Instrumentation libraries skip their spans while this context key is true.
_SUPPRESS_KEY: Any = getattr(otel_context, "_SUPPRESS_INSTRUMENTATION_KEY", None)


def _attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    """A plain dict of an SDK span's attributes, sequences (tuples there) as lists."""
    if not attributes:
        return {}
    # BoundedAttributes.copy() is a plain dict copy: several times faster than iterating the mapping.
    copied = attributes.copy() if isinstance(attributes, BoundedAttributes) else None
    out = copied if type(copied) is dict else dict(attributes)  # always a new dict: we change it
    for key, value in out.items():
        if type(value) is tuple:
            out[key] = list(value)  # replacing a value while iterating is allowed (no resize)
    return out


def to_span(
    span: ReadableSpan, rollout_id: str, attempt_id: str, sequence_id: int = AUTO_SEQUENCE_ID
) -> Span:
    """An ended SDK span as a :class:`~agl_async.Span` of the attempt (ids as lowercase hex,
    times in seconds, tuple attribute values as lists, events as ``{"name", "time", "attributes"}``)."""
    context = span.get_span_context()
    assert context is not None  # SDK spans always have one
    parent = span.parent
    status = span.status
    code = status.status_code
    start, end = span.start_time, span.end_time
    return Span(
        rollout_id=rollout_id,
        attempt_id=attempt_id,
        sequence_id=sequence_id,
        trace_id=f"{context.trace_id:032x}",
        span_id=f"{context.span_id:016x}",
        parent_id=f"{parent.span_id:016x}" if parent is not None else None,
        name=span.name,
        start_time=start / 1e9 if start else None,
        end_time=end / 1e9 if end else None,
        attributes=_attributes(span.attributes),
        events=[
            {"name": event.name, "time": event.timestamp / 1e9, "attributes": _attributes(event.attributes)}
            for event in span.events
        ],
        status_code="unset" if code is _UNSET else "ok" if code is _OK else "error",
        status_message=status.description or None,
    )


class AttemptSpans:
    """The spans of one agent call: collected as they end, written by :meth:`close_and_flush`."""

    __slots__ = ("_ended", "_lock", "attempt_id", "closed", "processor", "rollout_id", "store")

    def __init__(
        self, processor: AttemptSpanProcessor, store: LightningStore, rollout_id: str, attempt_id: str
    ) -> None:
        self.processor = processor
        self.store = store
        self.rollout_id = rollout_id
        self.attempt_id = attempt_id
        self.closed = False
        self._ended: list[ReadableSpan] = []
        self._lock = threading.Lock()

    def add(self, span: ReadableSpan) -> None:
        with self._lock:
            if not self.closed:
                self._ended.append(span)
                return
        self.processor.add_late(self, span)

    async def close_and_flush(self) -> None:
        """Stop collecting (later spans go to the processor's late list) and write what ended."""
        with self._lock:
            self.closed = True
            ended, self._ended = self._ended, []
        spans = [to_span(s, self.rollout_id, self.attempt_id) for s in ended]
        spans += self.processor.take_late(self.store)
        if spans:
            await write_spans(self.store, spans)


class AttemptSpanProcessor(SpanProcessor):
    """Routes each span started during an agent call to that call's :class:`AttemptSpans`."""

    def __init__(self) -> None:
        self._open: dict[int, AttemptSpans] = {}  # span id -> attempt, from start to end
        self._late: list[tuple[AttemptSpans, ReadableSpan]] = []
        self._late_lock = threading.Lock()

    def attempt(self, store: LightningStore, rollout_id: str, attempt_id: str) -> AttemptSpans:
        return AttemptSpans(self, store, rollout_id, attempt_id)

    def on_start(self, span: SDKSpan, parent_context: otel_context.Context | None = None) -> None:
        spans = tracing._CURRENT.get()
        if spans is None:
            parent = span.parent
            if parent is None or not self._open:
                return
            spans = self._open.get(parent.span_id)  # a child of an agent's span, e.g. in its own thread
            if spans is None:
                return
        self._open[span.context.span_id] = spans

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None or not self._open:
            return
        spans = self._open.pop(context.span_id, None)
        if spans is not None:
            spans.add(span)

    def add_late(self, spans: AttemptSpans, span: ReadableSpan) -> None:
        with self._late_lock:
            self._late.append((spans, span))

    def take_late(self, store: LightningStore) -> list[Span]:
        """Converted spans that ended after their call returned, for a flush to ``store``."""
        if not self._late:
            return []
        with self._late_lock:
            mine = [item for item in self._late if item[0].store is store]
            self._late = [item for item in self._late if item[0].store is not store]
        return [to_span(span, owner.rollout_id, owner.attempt_id) for owner, span in mine]

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


async def write_spans(store: LightningStore, spans: Sequence[Span]) -> None:
    """Write ``spans`` in batches of :data:`~agl_async.tracing.BATCH_SIZE`, with OpenTelemetry
    instrumentation suppressed (an instrumented HTTP client does not trace the runner's own
    requests). A batch the store refuses (``ValueError``: too large, an attempt it no longer
    knows) is split until the refused spans are found; those are dropped with a warning, as are
    all on any other store error (tracing never fails the attempt)."""
    token = otel_context.attach(otel_context.set_value(_SUPPRESS_KEY, True)) if _SUPPRESS_KEY else None
    try:
        size = tracing.BATCH_SIZE
        for start in range(0, len(spans), size):
            await _write_batch(store, list(spans[start : start + size]))
    finally:
        if token is not None:
            otel_context.detach(token)


async def _write_batch(store: LightningStore, batch: list[Span]) -> None:
    try:
        await store.add_many_spans(batch)
    except ValueError as exc:
        if len(batch) == 1:
            span = batch[0]
            logger.warning("span %r of attempt %s dropped: %s", span.name, span.attempt_id, exc)
            return
        middle = len(batch) // 2
        await _write_batch(store, batch[:middle])
        await _write_batch(store, batch[middle:])
    except Exception:
        logger.warning(
            "%d spans of attempt %s dropped: the store failed", len(batch), batch[0].attempt_id, exc_info=True
        )


def install_processor() -> AttemptSpanProcessor | None:
    """Add an :class:`AttemptSpanProcessor` to the global SDK ``TracerProvider``, installing a
    plain one first when the application has set none; ``None`` (with a warning) when the global
    provider is not the SDK's."""
    processor = AttemptSpanProcessor()
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider):  # nobody set one
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()  # ours, or one set concurrently
    add = getattr(provider, "add_span_processor", None)
    if not isinstance(provider, TracerProvider) and add is None:
        logger.warning(
            "the global OpenTelemetry tracer provider is a %s, not the SDK's TracerProvider: agent spans "
            "are not recorded in the store",
            type(provider).__name__,
        )
        return None
    provider.add_span_processor(processor)  # type: ignore[attr-defined]
    logger.debug("agent spans are recorded through %s", type(provider).__name__)
    return processor

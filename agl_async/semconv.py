"""Names with a meaning in the store: the attributes that place an OpenTelemetry span, the reward span.

They are Agent-Lightning 0.3's names, so that programs instrumented for it export to an agl_async
store server unchanged. The OTLP endpoint (:mod:`agl_async.http.otlp`) looks each of them up on
the span first, then on the span's resource.
"""

from __future__ import annotations

__all__ = ["ATTEMPT_ID", "REWARD_SPAN_NAME", "ROLLOUT_ID", "SPAN_SEQUENCE_ID"]

#: The rollout a span belongs to (a string).
ROLLOUT_ID = "agentlightning.rollout_id"
#: The attempt of that rollout a span belongs to (a string).
ATTEMPT_ID = "agentlightning.attempt_id"
#: Optional: the span's ``sequence_id`` (an integer or a decimal string); without it the store
#: numbers the span (the attempt's next sequence id).
SPAN_SEQUENCE_ID = "agentlightning.span_sequence_id"

#: Name of the span the runner loop records for an agent's reward (attribute ``"reward"``).
REWARD_SPAN_NAME = "agl_async.reward"

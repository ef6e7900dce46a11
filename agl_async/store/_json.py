"""JSON at the door of a durable store: what cannot be stored as JSON is refused where it enters.

A value that cannot be encoded (a string holding a lone surrogate, an object of an unknown type,
an integer beyond 64 bits) or that JSON has no way to express (``NaN``, ``inf``) raises a
``ValueError`` naming the field before anything is written, so no half-stored rollout can poison
the store for every later reader. Other values are stored as msgspec encodes them (tuples become
lists, bytes base64 text): readers get back the JSON value.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

__all__ = ["decode", "encode"]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


def encode(value: Any, what: str, *, allow_non_finite: bool = False) -> str:
    """``value`` as JSON text; ``ValueError`` naming ``what`` when it cannot be stored as JSON.

    ``allow_non_finite``: store NaN and infinities as ``null`` (as the HTTP layer does) instead
    of refusing them (spans: a metric that came out NaN must not cost the span).
    """
    try:
        data = _encoder.encode(value)
    except (TypeError, ValueError, OverflowError, UnicodeEncodeError) as exc:
        raise ValueError(f"{what} cannot be stored as JSON: {exc}") from None
    # msgspec writes NaN and infinities as null; a null in the output is the only sign of them.
    if not allow_non_finite and b"null" in data and _has_non_finite(value):
        raise ValueError(f"{what} cannot be stored as JSON: it holds NaN or an infinity")
    return data.decode()


def _has_non_finite(value: Any, depth: int = 0) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if depth > 1000:
        return False  # msgspec has already refused anything deeper than it can encode
    if isinstance(value, dict):
        return any(_has_non_finite(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_non_finite(v, depth + 1) for v in value)
    if isinstance(value, msgspec.Struct):
        return any(_has_non_finite(v, depth + 1) for v in msgspec.structs.astuple(value))
    return False


def decode(text: str) -> Any:
    """The value of stored JSON text."""
    return _decoder.decode(text)

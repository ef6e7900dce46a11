"""Checks of argument values shared by every layer: one rule and one message per kind of value.

Each check raises ``ValueError`` naming the parameter and the value it got, and is meant to run
*before* anything is changed, so a rejected call leaves no trace. The rules:

* seconds (timeouts, grace periods): a real number ``>= 0`` (``inf`` allowed); ``bool`` and NaN
  are not numbers of seconds; ``None`` only where the parameter is optional;
* counts (``n_runners``): an ``int`` ``>= 1``, ``bool`` excluded;
* worker ids: a ``str`` or an ``int`` (``bool`` excluded);
* a rollout config: a :class:`~agl_async.types.RolloutConfig` (checked again: its fields may have
  been assigned after construction) or a mapping of its fields;
* resources: a mapping of names to JSON values (the JSON rule below);
* enqueue requests: :class:`~agl_async.types.EnqueueRolloutRequest` or mappings of its fields;
* a ``limit`` (``dequeue_many_rollouts``): an ``int`` ``>= 0``.

The JSON rule (:func:`check_json_value`): a store keeps task inputs, metadata, resources and
heartbeat statistics as JSON, and hands them out as they come back from JSON, whichever store and
mode, in process or over HTTP. So a value is accepted only when it comes back *unchanged* from a
JSON round trip: ``dict`` with ``str`` keys, ``list``, ``str``, ``int`` (64-bit), finite ``float``,
``bool``, ``None``, nested no deeper than a few hundred levels. A tuple (which would come back as
a list), bytes (base64 text), ``NaN`` / ``inf`` (``null``), an integer key (a string), a
``Decimal`` or a ``datetime`` (strings), a set, an arbitrary object, or a string holding a lone
surrogate (not encodable at all) is refused with a ``ValueError`` that names the field and says
what is wrong, before anything is changed. Spans (:func:`check_encodable`) only need to be
encodable: OpenTelemetry attributes are often tuples, and are stored as the JSON lists they become.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from .types import EnqueueRolloutRequest, RolloutConfig

__all__ = [
    "as_config",
    "as_enqueue_requests",
    "as_resources",
    "check_count",
    "check_encodable",
    "check_json_value",
    "check_limit",
    "check_seconds",
    "check_worker_id",
]

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def check_seconds(value: Any, name: str = "timeout", *, optional: bool = True) -> None:
    """``value`` is a number of seconds ``>= 0`` (``inf`` included), or ``None`` when ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not value >= 0:
        also = " or None" if optional else ""
        raise ValueError(f"{name} must be a number of seconds >= 0{also}, got {value!r}")


def check_count(value: Any, name: str) -> None:
    """``value`` is a positive ``int`` (``bool`` is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_worker_id(worker_id: Any, *, optional: bool = True) -> None:
    """``worker_id`` is a ``str`` or an ``int`` (or ``None`` when ``optional``)."""
    if worker_id is None and optional:
        return
    if isinstance(worker_id, bool) or not isinstance(worker_id, (str, int)):
        also = " or None" if optional else ""
        raise ValueError(f"worker_id must be a string or an integer{also}, got {worker_id!r}")
    if isinstance(worker_id, str) and not worker_id.isascii():
        check_encodable(worker_id, "worker_id")


def check_limit(limit: Any) -> None:
    """``limit`` (of ``dequeue_many_rollouts``) is an ``int`` ``>= 0`` (``bool`` is not)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be an integer >= 0, got {limit!r}")


def check_encodable(value: Any, what: str) -> bytes:
    """``value`` encoded as JSON; ``ValueError`` naming ``what`` when it cannot be encoded at all
    (a lone surrogate in a string, an object of an unknown type, an integer beyond 64 bits,
    nesting too deep). Returns the encoding."""
    try:
        return _encode(value)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to be stored as JSON") from None
    except (TypeError, ValueError, OverflowError) as exc:  # UnicodeEncodeError is a ValueError
        raise ValueError(f"{what} cannot be stored as JSON: {exc}") from None


def check_json_value(value: Any, what: str) -> Any:
    """The JSON rule (see the module docstring): ``value`` comes back unchanged from a JSON round
    trip, else ``ValueError`` naming ``what`` and the part that would change. Returns ``value``."""
    if value is None or (type(value) is str and value.isascii()):
        return value  # the common cheap cases
    data = check_encodable(value, what)
    try:
        back = _decode(data)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to be stored as JSON") from None
    if back != value:
        raise ValueError(f"{what} does not survive a JSON round trip: {_first_change(value, back, what)}")
    return value


def _first_change(value: Any, back: Any, path: str) -> str:
    """A human description of the first part of ``value`` that a JSON round trip changes
    (``back`` is what the round trip made of it); ``""`` when ``value`` comes back equal."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{path} is {value!r}, which JSON cannot express (it would come back as null)"
    if isinstance(value, (tuple, set, frozenset)):
        return f"{path} is a {type(value).__name__}, which would come back as a list: use a list"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"{path} is {type(value).__name__}, which would come back as base64 text: use a str"
    if isinstance(value, Mapping) and isinstance(back, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return (
                    f"{path} has the {type(key).__name__} key {key!r}, which would come back as "
                    f"the string {str(key)!r}: use str keys"
                )
            found = _first_change(item, back.get(key), f"{path}[{key!r}]")
            if found:
                return found
    elif isinstance(value, list) and isinstance(back, list) and len(value) == len(back):
        for i, (item, item_back) in enumerate(zip(value, back, strict=True)):
            found = _first_change(item, item_back, f"{path}[{i}]")
            if found:
                return found
    if value == back:
        return ""
    return (
        f"{path} is a {type(value).__name__} ({_short(value)}), which would come back as the "
        f"{type(back).__name__} {_short(back)}: use JSON types (dict with str keys, list, str, int, "
        "float, bool, None)"
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def as_config(config: Any) -> RolloutConfig | None:
    """A checked :class:`RolloutConfig` from one or from a mapping of its fields; ``None`` stays."""
    if config is None:
        return None
    if isinstance(config, RolloutConfig):
        config.__post_init__()  # fields may have been assigned after construction: check again
        return config
    if isinstance(config, Mapping):
        try:
            return RolloutConfig(**config)
        except TypeError as exc:
            raise ValueError(f"invalid rollout config {dict(config)!r}: {exc}") from None
    raise ValueError(f"config must be a RolloutConfig, a mapping or None, got {type(config).__name__}")


def as_resources(resources: Any) -> dict[str, Any]:
    """A plain ``dict`` copy of a mapping of resource names to JSON values (the JSON rule)."""
    if not isinstance(resources, Mapping):
        raise ValueError(f"resources must be a mapping of names to values, got {type(resources).__name__}")
    copy = dict(resources)
    check_json_value(copy, "resources")
    return copy


def as_enqueue_requests(
    rollouts: Sequence[EnqueueRolloutRequest | Mapping[str, Any]],
) -> list[EnqueueRolloutRequest]:
    """Request structs from structs or plain mappings with ``enqueue_rollout``'s keyword names."""
    out = []
    for item in rollouts:
        if isinstance(item, EnqueueRolloutRequest):
            out.append(item)
        elif isinstance(item, Mapping):
            try:
                out.append(EnqueueRolloutRequest(**item))
            except TypeError as exc:
                raise ValueError(f"invalid enqueue request {dict(item)!r}: {exc}") from None
        else:
            raise ValueError(f"enqueue requests must be EnqueueRolloutRequest or mappings, got {item!r}")
    return out

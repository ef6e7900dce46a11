"""Checks of argument values shared by every layer: one rule and one message per kind of value.

Each check raises ``ValueError`` naming the parameter and the value it got, and is meant to run
*before* anything is changed, so a rejected call leaves no trace. The rules:

* seconds (timeouts, grace periods): a real number ``>= 0`` (``inf`` allowed); ``bool`` and NaN
  are not numbers of seconds; ``None`` only where the parameter is optional;
* counts (``n_runners``): an ``int`` ``>= 1``, ``bool`` excluded;
* worker ids: a ``str`` or an ``int`` (``bool`` excluded);
* a rollout config: a :class:`~agl_async.types.RolloutConfig` (checked again: its fields may have
  been assigned after construction) or a mapping of its fields;
* resources: a mapping of names to values;
* enqueue requests: :class:`~agl_async.types.EnqueueRolloutRequest` or mappings of its fields.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .types import EnqueueRolloutRequest, RolloutConfig

__all__ = [
    "as_config",
    "as_enqueue_requests",
    "as_resources",
    "check_count",
    "check_seconds",
    "check_worker_id",
]


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
    """A plain ``dict`` copy of a mapping of resource names to values."""
    if not isinstance(resources, Mapping):
        raise ValueError(f"resources must be a mapping of names to values, got {type(resources).__name__}")
    return dict(resources)


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

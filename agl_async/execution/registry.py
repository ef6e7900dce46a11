"""Execution strategies by name: the aliases ``Trainer(strategy=...)`` accepts.

:func:`resolve_strategy` builds a strategy from an instance (returned as is), a class, an alias,
or a dict ``{"type": alias or class, **kwargs}``. The aliases are the rows of :data:`STRATEGIES`
(a new strategy is a new row); a strategy module is imported only when its alias is resolved.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from .base import ExecutionStrategy

__all__ = ["STRATEGIES", "resolve_strategy"]

#: Alias -> ``"module:Class"`` of the strategy it names.
STRATEGIES: dict[str, str] = {
    "shm": "agl_async.execution.shared_memory:SharedMemoryExecutionStrategy",
    "shared_memory": "agl_async.execution.shared_memory:SharedMemoryExecutionStrategy",
    "cs": "agl_async.execution.client_server:ClientServerExecutionStrategy",
    "client_server": "agl_async.execution.client_server:ClientServerExecutionStrategy",
    "ray": "agl_async.execution.ray:RayExecutionStrategy",  # issue 15; needs the ray extra
}


def _strategy_class(name: str) -> type[ExecutionStrategy]:
    target = STRATEGIES.get(name)
    if target is None:
        known = ", ".join(sorted(STRATEGIES))
        raise ValueError(f"unknown execution strategy {name!r}; known aliases: {known}")
    module_name, _, attr = target.partition(":")
    cls: type[ExecutionStrategy] = getattr(importlib.import_module(module_name), attr)
    return cls


def resolve_strategy(
    spec: ExecutionStrategy | type[ExecutionStrategy] | str | Mapping[str, Any] | None,
    *,
    default: str = "shm",
    **defaults: Any,
) -> ExecutionStrategy:
    """Build a strategy from an instance (returned as is), a class, an alias, a dict
    ``{"type": alias, **kwargs}``, or ``None`` (``default``).

    ``defaults`` (e.g. ``n_runners=4``) fill constructor parameters that the spec does not set
    and that the class accepts. Raises ``ValueError`` for an unknown alias or a dict without
    ``"type"``, and ``TypeError`` for anything else.
    """
    if isinstance(spec, ExecutionStrategy):
        return spec
    kwargs: dict[str, Any] = {}
    if spec is None:
        cls = _strategy_class(default)
    elif isinstance(spec, str):
        cls = _strategy_class(spec)
    elif isinstance(spec, type) and issubclass(spec, ExecutionStrategy):
        cls = spec
    elif isinstance(spec, Mapping):
        if "type" not in spec:
            raise ValueError(
                f'a strategy dict needs a "type" key (e.g. {{"type": "shm"}}), got {dict(spec)!r}'
            )
        kwargs = {k: v for k, v in spec.items() if k != "type"}
        kind = spec["type"]
        if isinstance(kind, type) and issubclass(kind, ExecutionStrategy):
            cls = kind
        elif isinstance(kind, str):
            cls = _strategy_class(kind)
        else:
            raise ValueError(f'strategy "type" must be an alias or an ExecutionStrategy class, got {kind!r}')
    else:
        raise TypeError(
            f"strategy must be an ExecutionStrategy, an alias such as 'shm' / 'cs', or a dict "
            f'{{"type": ...}}, got {type(spec).__name__}'
        )
    params = inspect.signature(cls.__init__).parameters
    for key, value in defaults.items():
        if key not in kwargs and key in params and value is not None:
            kwargs[key] = value
    return cls(**kwargs)

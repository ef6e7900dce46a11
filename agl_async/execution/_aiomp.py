"""The one place agl_async depends on aiomultiprocess beyond its public API.

``aiomultiprocess.Process(target=..., args=..., kwargs=..., name=..., process_target=...)`` is its
public constructor, and it does what we need except one thing: it takes a ``Namespace`` from the
library's module-level ``Manager`` singleton (``get_manager().Namespace()``), which starts a
manager *server process* on first use — spawned, re-importing ``__main__`` — that the library
never shuts down, and that no public call can replace or reset. Only aiomultiprocess's own
``Worker`` / ``Pool`` read that namespace (to hand results back); our process target
(:func:`~agl_async.execution.processes.child_main`) never does. So :func:`new_process` makes the
same object the constructor would, with a plain namespace in its place: one process less to start
(and to leave behind) per run.

What this relies on, pinned by ``tests/test_processes.py`` against the installed aiomultiprocess
(``aiomultiprocess>=0.9,<0.10`` in pyproject.toml): a ``Process`` carries its call in ``unit``
(``aiomultiprocess.types.Unit``: target, args, kwargs, namespace) and its
``multiprocessing.Process`` in ``aio_process``, made from ``aiomultiprocess.core.get_context()``
with ``process_target`` as its target and ``(unit,)`` as its arguments; every other method
(``start``, ``pid``, ``exitcode``, ``terminate``, ``kill``, ``close``, ``join``) works on those two.
"""

from __future__ import annotations

import types
from collections.abc import Awaitable, Callable
from typing import Any

import aiomultiprocess
import aiomultiprocess.core
from aiomultiprocess.types import Unit

__all__ = ["new_process"]


def new_process(
    target: Callable[..., Awaitable[None]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    name: str,
    process_target: Callable[[Any], None],
) -> aiomultiprocess.Process:
    """An unstarted ``aiomultiprocess.Process`` as the public constructor makes it, but without the
    library's Manager (see the module docstring)."""
    process: aiomultiprocess.Process = aiomultiprocess.Process.__new__(aiomultiprocess.Process)
    process.unit = Unit(target=target, args=args, kwargs=kwargs, namespace=types.SimpleNamespace())
    process.aio_process = aiomultiprocess.core.get_context().Process(
        target=process_target, args=(process.unit,), name=name
    )
    return process

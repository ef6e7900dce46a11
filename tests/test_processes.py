"""The one coupling to aiomultiprocess beyond its public API (``agl_async.execution._aiomp``), pinned
against the installed version: if one of these fails after an upgrade, the adapter must change."""

from __future__ import annotations

import multiprocessing
import sys
from typing import Any

import aiomultiprocess
import aiomultiprocess.core
import pytest
from aiomultiprocess.types import Unit

from agl_async.execution._aiomp import new_process


async def _target(*args: Any, **kwargs: Any) -> None:
    pass


def _exit_with_args(unit: Any) -> None:
    """A process target: exits with a code built from what it received (checks the unit crossed)."""
    sys.exit(10 + len(unit.args) + len(unit.kwargs) if unit.target is _target else 1)


def test_the_public_constructor_takes_a_manager_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why the adapter exists: ``Process.__init__`` asks the Manager singleton for a namespace (which
    starts a manager process). Recorded without starting one."""
    calls: list[str] = []

    class FakeManager:
        def Namespace(self) -> object:
            calls.append("Namespace")
            return object()

    monkeypatch.setattr(aiomultiprocess.core, "get_manager", lambda: FakeManager())
    public = aiomultiprocess.Process(target=_target, args=(1,), name="x", process_target=_exit_with_args)
    assert calls == ["Namespace"]
    adapted = new_process(_target, (1,), {}, name="x", process_target=_exit_with_args)
    assert calls == ["Namespace"]  # the adapter asked for none
    assert vars(public).keys() == vars(adapted).keys() == {"unit", "aio_process"}
    assert type(public.unit) is type(adapted.unit) is Unit
    assert type(public.aio_process) is type(adapted.aio_process)
    assert public.unit._replace(namespace=None) == adapted.unit._replace(namespace=None)


def test_a_process_is_its_unit_and_its_multiprocessing_process() -> None:
    """The adapter builds what the constructor builds: same attributes, same types, same wiring."""
    assert list(Unit._fields[:4]) == ["target", "args", "kwargs", "namespace"]
    before = aiomultiprocess.core._manager
    process = new_process(_target, (1, 2), {"k": 3}, name="pinned", process_target=_exit_with_args)
    assert aiomultiprocess.core._manager is before  # no manager was started
    assert isinstance(process, aiomultiprocess.Process)
    assert isinstance(process.unit, Unit)
    assert (process.unit.target, tuple(process.unit.args), process.unit.kwargs) == (_target, (1, 2), {"k": 3})
    assert isinstance(process.aio_process, multiprocessing.process.BaseProcess)
    assert process.name == "pinned" and process.pid is None and process.exitcode is None


def test_the_public_methods_drive_the_adapted_process() -> None:
    """start / pid / join via the sentinel / exitcode / close work on what the adapter made, and the
    process target receives the unit (spawn start method: it pickles across)."""
    process = new_process(_target, (1, 2), {"k": 3}, name="pinned", process_target=_exit_with_args)
    process.start()
    assert isinstance(process.pid, int)
    process.aio_process.join(60)
    assert process.exitcode == 13  # 10 + two args + one kwarg, and the target came through
    assert not process.is_alive()
    process.close()

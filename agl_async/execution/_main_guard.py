"""The ``if __name__ == "__main__":`` guard, checked before a run starts child processes.

Child processes are started with the ``spawn`` method: each one imports the main script again
(as ``__mp_main__``) before it runs its bundle. A script that starts the run at module level,
outside ``if __name__ == "__main__":``, would start it again in every child — which then dies in
multiprocessing's bootstrapping error, after re-running whatever the script does at import.
:func:`check_main_guard` finds the main script's module-level line that is starting the run (on
the calling thread's stack) and, when that line is not inside such a guard, raises a
``RuntimeError`` that says so and what to write — before any process is started.

Nothing is checked when there is no main script to re-import (an interactive session, ``python
-c``, a notebook), when the run is not started from the main script's module level (another
thread, a test runner), or when the start method does not re-import the main module (``fork``).
"""

from __future__ import annotations

import ast
import functools
import sys
from types import FrameType

__all__ = ["check_main_guard"]


def check_main_guard(start_method: str) -> None:
    """``RuntimeError`` when the run is being started at import time of the main script (see
    the module docstring); ``start_method`` is the one the children are started with."""
    if start_method == "fork":
        return
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not isinstance(path, str) or not path.endswith(".py"):
        return
    frame = _module_level_frame_of(vars(main))
    if frame is None:
        return
    line = frame.f_lineno
    if line in _guarded_lines(path):
        return
    raise RuntimeError(
        "client-server mode starts its processes with the 'spawn' method, which imports your script "
        f"({path}) again in each of them; this run is started while the script is being imported "
        f"(line {line}), so every process would start it again. Put the code that starts the run "
        'under `if __name__ == "__main__":` (e.g. `if __name__ == "__main__": main()`).'
    )


def _module_level_frame_of(namespace: dict[str, object]) -> FrameType | None:
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_globals is namespace and frame.f_code.co_name == "<module>":
            return frame
        frame = frame.f_back
    return None


@functools.lru_cache(maxsize=8)
def _guarded_lines(path: str) -> frozenset[int]:
    """Line numbers inside ``if __name__ == "__main__":`` blocks of the file (all lines when
    the file cannot be read or parsed: nothing to say then)."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, ValueError):
        return frozenset(range(1, 1_000_000))
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_main_test(node.test):
            for child in node.body:
                end = getattr(child, "end_lineno", None) or child.lineno
                lines.update(range(child.lineno, end + 1))
    return frozenset(lines)


def _is_main_test(test: ast.expr) -> bool:
    """``__name__ == "__main__"`` (either way round)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    values = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(values) == 1

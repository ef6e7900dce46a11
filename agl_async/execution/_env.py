"""Constructor arguments from ``AGL_*`` environment variables, for the execution strategies.

Each helper takes the argument as given (``None``: not given), else the variable when it is set and
not blank, else the default; a bad value raises ``ValueError`` naming the parameter or the
variable it came from.
"""

from __future__ import annotations

import os

__all__ = ["env_bool", "env_choice", "env_int", "env_str"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _env(name: str) -> str | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    return raw.strip()


def env_str(name: str, override: str | None, default: str) -> str:
    """``override`` if given, else env ``name`` if set and non-empty, else ``default``."""
    if override is not None:
        return override
    raw = _env(name)
    return default if raw is None else raw


def env_choice(name: str, param: str, override: str | None, default: str, choices: tuple[str, ...]) -> str:
    """Like :func:`env_str`, restricted to ``choices``; a bad value names ``param`` or ``name``."""
    value = env_str(name, override, default)
    if value not in choices:
        source = param if override is not None else f"environment variable {name}"
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{source} must be one of {allowed}, got {value!r}")
    return value


def env_int(name: str, param: str, override: int | None, default: int) -> int:
    """``override`` / env ``name`` parsed as an integer / ``default``."""
    if override is not None:
        if isinstance(override, bool) or not isinstance(override, int):
            raise ValueError(f"{param} must be an integer, got {override!r}")
        return override
    raw = _env(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def env_bool(name: str, param: str, override: bool | None, default: bool) -> bool:
    """``override`` / env ``name`` parsed as a boolean (1/0, true/false, yes/no, on/off)."""
    if override is not None:
        if not isinstance(override, bool):
            raise ValueError(f"{param} must be a boolean, got {override!r}")
        return override
    raw = _env(name)
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(
        f"environment variable {name} must be a boolean (1/0, true/false, yes/no, on/off), got {raw!r}"
    )

"""What importing costs: a runner process (trainer + process plumbing + HTTP client) must not load
the server side (uvicorn, starlette), and ``import agl_async`` loads no heavy dependency at all.
Checked in fresh interpreters, since the test session itself has imported everything."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("uvicorn", "starlette", "httpx", "aiomultiprocess", "sqlite3", "asyncpg", "aiosqlite")


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return set(out.stdout.split())


def test_import_agl_async_loads_no_heavy_dependency() -> None:
    assert _loaded_after("import agl_async") == set()


def test_a_runner_process_does_not_load_the_server_side() -> None:
    loaded = _loaded_after(
        "import agl_async.trainer, agl_async.execution.processes, agl_async.http.client\n"
        "from agl_async import LightningStoreClient, Trainer"
    )
    assert "uvicorn" not in loaded and "starlette" not in loaded
    assert "httpx" in loaded  # the client side is what a runner needs


def test_database_drivers_load_only_with_their_store() -> None:
    # open_store and the trainer (which accepts store URLs) import no driver until a URL needs it
    assert _loaded_after("from agl_async import open_store, Trainer\nopen_store('memory://')") == set()
    sqlite = _loaded_after("from agl_async import SqliteLightningStore")
    assert "sqlite3" in sqlite and "asyncpg" not in sqlite
    assert "sqlite3" in _loaded_after("from agl_async import open_store\nopen_store('sqlite:///x.db')")


def test_opentelemetry_is_imported_only_when_an_agent_runs_or_protobuf_arrives() -> None:
    code = (
        "import sys\nimport agl_async.trainer, agl_async.tracing, agl_async.traces, agl_async.http.server\n"
        "from agl_async import LightningStoreServer, Trainer\n"
        "print(' '.join(m for m in sys.modules if m.startswith(('opentelemetry', 'google'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == []

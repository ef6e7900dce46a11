"""``open_store(url)`` and what takes store URLs: ``Trainer(store=url)``, ``agl-async serve --store``
and the resumable ``agl-async demo --store``."""

from __future__ import annotations

import importlib.util
import re
import signal
from pathlib import Path

import anyio
import pytest
from test_cli import Proc, procs, run_cli  # noqa: F401 - procs is a fixture

from agl_async import InMemoryLightningStore, LightningStoreClient, SqliteLightningStore, Trainer, open_store
from agl_async.testing import free_port, store_fixture

HAS_POSTGRES = importlib.util.find_spec("agl_async.store.postgres") is not None


# ---------------------------------------------------------------------------------- open_store
def test_memory_url() -> None:
    first, second = open_store("memory://"), open_store("memory://")
    assert isinstance(first, InMemoryLightningStore) and first is not second


def test_sqlite_url_with_a_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///runs/a.db")
    assert isinstance(store, SqliteLightningStore)
    assert store.path == str(tmp_path / "runs" / "a.db")
    assert store.synchronous == "normal"
    assert not (tmp_path / "runs").exists()  # nothing is opened until the first call


def test_sqlite_url_with_an_absolute_path(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/b.db?synchronous=FULL")
    assert isinstance(store, SqliteLightningStore)
    assert store.path == str(tmp_path / "b.db") and store.synchronous == "full"


def test_scheme_is_case_insensitive(tmp_path: Path) -> None:
    assert isinstance(open_store(f"SQLite:///{tmp_path}/c.db"), SqliteLightningStore)
    assert isinstance(open_store("MEMORY://"), InMemoryLightningStore)


@pytest.mark.anyio
async def test_a_sqlite_url_store_is_usable_and_connects_on_first_use(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/d.db")
    assert not (tmp_path / "d.db").exists()
    r = await store.enqueue_rollout("x")
    assert (tmp_path / "d.db").exists()
    await store.close()
    async with SqliteLightningStore(tmp_path / "d.db") as again:
        assert await again.get_rollout_by_id(r.rollout_id) == r


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("nonsense", "not a store URL"),
        ("://x", "not a store URL"),
        ("mysql://u@h/db", "unknown store URL scheme 'mysql://'"),
        ("http://127.0.0.1:4747", "unknown store URL scheme"),
        ("memory://something", "memory:// takes nothing"),
        ("sqlite://host/x.db", "has no host"),
        ("sqlite://", "has no host"),
        ("sqlite:///", "names no file"),
        ("sqlite:////tmp/dir/", "names no file"),
        ("sqlite:///x.db?mode=ro", "unknown option 'mode'"),
        ("sqlite:///x.db?synchronous=off", "synchronous"),
        ("sqlite:///x.db?synchronous", "synchronous"),
        ("sqlite:///:memory:", "file path"),
    ],
)
def test_bad_urls_are_value_errors(url: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        open_store(url)


def test_a_url_must_be_a_string() -> None:
    with pytest.raises(ValueError, match="string"):
        open_store(b"memory://")  # type: ignore[arg-type]


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_postgres_url(scheme: str) -> None:
    url = f"{scheme}://agl:secret@127.0.0.1:1/agl"  # nothing listens: nothing is connected yet
    if HAS_POSTGRES:
        from agl_async import PostgresLightningStore

        assert isinstance(open_store(url), PostgresLightningStore)
    else:
        with pytest.raises(RuntimeError, match="no PostgreSQL store"):
            open_store(url)


# ---------------------------------------------------------------------------------- Trainer
def test_trainer_takes_a_store_url(tmp_path: Path) -> None:
    trainer = Trainer(store=f"sqlite:///{tmp_path}/t.db")
    assert isinstance(trainer.store, SqliteLightningStore)
    assert trainer.store.path == str(tmp_path / "t.db")
    assert isinstance(Trainer(store="memory://").store, InMemoryLightningStore)
    with pytest.raises(ValueError, match="unknown store URL scheme"):
        Trainer(store="redis://localhost")


async def _double(task: int, resources: dict[str, object]) -> float:
    return float(task * 2)


def test_a_run_on_a_sqlite_url_leaves_its_results_in_the_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/fit.db"
    Trainer(store=url, n_runners=2).fit(_double, train_dataset=[1, 2, 3])

    async def read() -> list[float]:
        async with SqliteLightningStore(tmp_path / "fit.db") as store:
            rollouts = await store.query_rollouts(status_in=["succeeded"])
            return sorted(r.metadata["reward"] for r in rollouts)

    assert anyio.run(read) == [2.0, 4.0, 6.0]


# ---------------------------------------------------------------------------------- CLI: serve
async def _enqueue(endpoint: str) -> str:
    async with LightningStoreClient(endpoint) as client:
        return (await client.enqueue_rollout({"kept": True})).rollout_id


async def _get(endpoint: str, rollout_id: str) -> object:
    async with LightningStoreClient(endpoint) as client:
        rollout = await client.get_rollout_by_id(rollout_id)
        return None if rollout is None else rollout.input


def test_serve_a_sqlite_store_keeps_it_across_restarts(tmp_path: Path, procs: list[Proc]) -> None:  # noqa: F811
    url = f"sqlite:///{tmp_path}/served.db"
    endpoint = ""
    rollout_id = ""
    for run in range(2):
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        server = Proc("serve", "--port", str(port), "--store", url)
        procs.append(server)
        server.wait_for_line(rf"listening on {re.escape(endpoint)}, store {re.escape(url)}")
        if run == 0:
            rollout_id = anyio.run(_enqueue, endpoint)
        else:
            assert anyio.run(_get, endpoint, rollout_id) == {"kept": True}
        server.popen.send_signal(signal.SIGINT)
        assert server.wait() == 0, server.output


def test_serve_refuses_a_bad_store_url() -> None:
    result = run_cli("serve", "--store", "mongodb://localhost/x")
    assert result.returncode == 2
    assert "--store: unknown store URL scheme 'mongodb://'" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_reports_a_store_it_cannot_open(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/no/such/dir/x.db"
    result = run_cli("serve", "--port", str(free_port()), "--store", url)
    assert result.returncode == 1
    assert f"cannot open the store {url}" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------- CLI: demo
def _rewards(output: str) -> list[str]:
    return re.findall(r"^ +\d+ \| +104 \| +\d+ \| +(\d\.\d+) ", output, re.MULTILINE)


def test_demo_on_sqlite_resumes_after_a_kill(tmp_path: Path, procs: list[Proc]) -> None:  # noqa: F811
    """Killed in its second epoch, the demo started again continues there (the first epoch is not
    run again) and ends with the figures of an uninterrupted run."""
    url = f"sqlite:///{tmp_path}/demo.db"
    args = ("demo", "--epochs", "3", "--runners", "4", "--seed", "3", "--latency", "0.02")
    first = Proc(*args, "--store", url)
    procs.append(first)
    first.wait_for_line(r"^epoch +1/3 +104 rollouts")
    first.popen.send_signal(signal.SIGKILL)
    first.wait()

    resumed = run_cli(*args, "--store", url)
    assert resumed.returncode == 0, resumed.stderr
    assert "found a run that finished 1 epoch(s) in this store: resuming at epoch 2" in resumed.stdout
    assert not re.search(r"^epoch +1/3 +104 rollouts", resumed.stdout, re.MULTILINE)
    uninterrupted = run_cli(*args)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    assert _rewards(resumed.stdout) == _rewards(uninterrupted.stdout) and len(_rewards(resumed.stdout)) == 3

    again = run_cli(*args, "--store", url)
    assert "nothing left to do" in again.stdout
    assert _rewards(again.stdout) == _rewards(uninterrupted.stdout)


def test_demo_refuses_a_store_of_another_run(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/demo.db"
    assert run_cli("demo", "--epochs", "1", "--latency", "0", "--store", url).returncode == 0
    other = run_cli("demo", "--epochs", "1", "--latency", "0", "--seed", "9", "--store", url)
    assert other.returncode == 1
    assert "agl-async: error: the store holds an evolution run with" in other.stderr


# ---------------------------------------------------------------------------------- docs
async def _by_id(task: dict[str, int], resources: dict[str, object]) -> float:
    return float(task["id"])


def test_the_resume_example_of_the_docs_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/durable.md's ``ResumableBaseline``, run twice on one SQLite file: the second run finds
    the first one's rollouts and enqueues only the new tasks."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "durable.md").read_text()
    [code] = [
        b for b in re.findall(r"```python\n(.*?)```", page, re.DOTALL) if "class ResumableBaseline" in b
    ]
    namespace: dict[str, object] = {}
    exec(compile(code, "docs/durable.md", "exec"), namespace)
    monkeypatch.chdir(tmp_path)
    for n in (3, 5):
        algorithm = namespace["ResumableBaseline"]()  # type: ignore[operator]
        Trainer(algorithm=algorithm, store="sqlite:///baseline.db").fit(_by_id, [{"id": i} for i in range(n)])
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == [
        "0 found from before, 3 enqueued now, 3 succeeded",
        "3 found from before, 2 enqueued now, 5 succeeded",
    ]


# ---------------------------------------------------------------------------------- agl_async.testing
sqlite_user_store = store_fixture("sqlite", name="sqlite_user_store")


@pytest.mark.anyio
async def test_the_testing_helpers_make_sqlite_stores(sqlite_user_store: SqliteLightningStore) -> None:
    assert isinstance(sqlite_user_store, SqliteLightningStore)
    r = await sqlite_user_store.enqueue_rollout(1)
    assert await sqlite_user_store.get_rollout_by_id(r.rollout_id) == r
    assert await anyio.Path(sqlite_user_store.path).exists()

"""A throwaway PostgreSQL cluster for tests and benchmarks (stdlib only, no driver needed).

PostgreSQL refuses to run as root, and tests and CI run as root: the cluster runs as an
unprivileged system user (created with ``useradd --system`` when missing), in a temporary
directory owned by it, through ``runuser -u USER --``. It listens on 127.0.0.1 on a free port
(its Unix socket lives inside the temporary directory, so clusters never collide), trusts local
connections, and trades durability against a crash of the *server* for speed (``fsync=off``):
what the tests check is durability against the death of the *client* processes, which the
server's commit gives regardless. When not running as root, the cluster runs as the current user.

The cluster does not outlive the process that started it, even a killed one: a small reaper
process holds the read end of a pipe whose write end only the starting process has; when that
process ends (normally or by SIGKILL) the pipe closes, and the reaper stops the cluster and
removes its directory.

The binaries come from ``AGL_PG_BINDIR``, ``pg_config --bindir`` or the newest
``/usr/lib/postgresql/*/bin`` (Debian's ``postgresql`` package does not put them on ``PATH``);
:func:`find_bindir` returns ``None`` when there are none, and the fixtures skip with that reason.

Usage::

    with PostgresCluster() as cluster:
        dsn = cluster.create_database()   # a fresh, empty database
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from types import TracebackType

__all__ = ["PG_USER", "PostgresCluster", "find_bindir", "skip_reason"]

#: The unprivileged system user that runs test clusters when we are root.
PG_USER = "agl_pgtest"


def find_bindir() -> str | None:
    """The directory holding ``initdb`` / ``pg_ctl`` / ``postgres``, or ``None``."""
    candidates = []
    if os.environ.get("AGL_PG_BINDIR"):
        candidates.append(os.environ["AGL_PG_BINDIR"])
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            candidates.append(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass

    def version(path: str) -> float:
        try:
            return float(path.split("/")[-2])
        except ValueError:
            return 0.0

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    for path in candidates:
        if path and all(os.access(os.path.join(path, b), os.X_OK) for b in ("initdb", "pg_ctl", "postgres")):
            return path
    return None


def skip_reason() -> str | None:
    """Why PostgreSQL tests cannot run here (``None`` when they can)."""
    if find_bindir() is None:
        return (
            "PostgreSQL server binaries not found (install Debian's `postgresql` package, or set "
            "AGL_PG_BINDIR to the directory holding initdb and pg_ctl)"
        )
    if os.geteuid() == 0 and not (shutil.which("runuser") and (shutil.which("useradd") or _user_exists())):
        return "running as root but `runuser`/`useradd` are missing (PostgreSQL refuses to run as root)"
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return "asyncpg is not installed (pip install 'agl-async[postgres]')"
    return None


def _user_exists(name: str = PG_USER) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


# The reaper: blocks reading a pipe until the starter's end closes, then stops the cluster.
_REAPER = """
import os, shutil, subprocess, sys
fd, datadir, tmpdir, *command = sys.argv[1:]
while os.read(int(fd), 1):
    pass
if os.path.exists(os.path.join(datadir, "postmaster.pid")):
    subprocess.run([*command, "-D", datadir, "-m", "immediate", "-w", "stop"], capture_output=True)
shutil.rmtree(tmpdir, ignore_errors=True)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresCluster:
    """One ``initdb``-fresh cluster in a temporary directory; ``start()`` / ``stop()`` or ``with``.

    ``settings`` are extra ``postgresql.conf`` parameters (``name -> value``).
    """

    def __init__(self, *, settings: dict[str, str] | None = None, superuser: str = "agl") -> None:
        bindir = find_bindir()
        if bindir is None:
            raise RuntimeError(skip_reason() or "PostgreSQL binaries not found")
        self.bindir = bindir
        self.superuser = superuser
        self.settings = {
            "fsync": "off",  # tests kill clients, never the server: commits stay visible without it
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "64MB",
            **(settings or {}),
        }
        self.port = 0
        self.tmpdir: str | None = None
        self._lifeline: int | None = None  # write end of the reaper's pipe
        self._reaper: subprocess.Popen[bytes] | None = None
        self._as_user: list[str] = []
        self._names = itertools.count(1)

    # ------------------------------------------------------------------ paths and commands
    @property
    def datadir(self) -> str:
        assert self.tmpdir is not None
        return os.path.join(self.tmpdir, "data")

    @property
    def logfile(self) -> str:
        assert self.tmpdir is not None
        return os.path.join(self.tmpdir, "server.log")

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [*self._as_user, *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({out.returncode}): {out.stderr or out.stdout}")
        return out

    def _bin(self, name: str) -> str:
        return os.path.join(self.bindir, name)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> PostgresCluster:
        if os.geteuid() == 0:
            if not _user_exists():
                # Another test session may create it at the same moment: "exists" (9) is fine.
                subprocess.run(
                    ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                    capture_output=True,
                    check=False,
                )
                if not _user_exists():
                    raise RuntimeError(f"could not create the system user {PG_USER!r}")
            self._as_user = ["runuser", "-u", PG_USER, "--"]
        self.tmpdir = tempfile.mkdtemp(prefix="agl-pg-")
        if os.geteuid() == 0:
            shutil.chown(self.tmpdir, PG_USER, PG_USER)
        os.chmod(self.tmpdir, 0o755)  # the client (root or not) only needs TCP; logs readable
        self._run(
            self._bin("initdb"),
            "-D",
            self.datadir,
            "-U",
            self.superuser,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        options = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": self.tmpdir,
            **self.settings,
        }
        read_end, self._lifeline = os.pipe()
        self._reaper = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _REAPER,
                str(read_end),
                self.datadir,
                self.tmpdir,
                *self._as_user,
                self._bin("pg_ctl"),
            ],
            pass_fds=(read_end,),
            start_new_session=True,  # a Ctrl-C to the tests does not stop it before it has cleaned up
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(read_end)
        for attempt in range(5):  # a free port may be taken between choosing and binding it
            self.port = _free_port()
            opts = " ".join(f"-c {k}={v}" for k, v in {**options, "port": str(self.port)}.items())
            try:
                self._run(
                    self._bin("pg_ctl"), "-D", self.datadir, "-l", self.logfile, "-o", opts, "-w", "start"
                )
                return self
            except RuntimeError:
                if attempt == 4:
                    raise RuntimeError(f"postgres did not start: {self.server_log()}") from None
        return self

    def server_log(self) -> str:
        try:
            with open(self.logfile) as f:
                return f.read()[-4000:]
        except OSError:
            return "<no log>"

    def restart(self) -> None:
        """Stop (fast: clients are disconnected) and start again on the same port."""
        self._run(self._bin("pg_ctl"), "-D", self.datadir, "-l", self.logfile, "-m", "fast", "-w", "restart")

    def stop(self) -> None:
        if self.tmpdir is None:
            return
        try:
            if os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
                self._run(self._bin("pg_ctl"), "-D", self.datadir, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
            if self._lifeline is not None:
                os.close(self._lifeline)  # the reaper finds nothing left to do and exits
                self._lifeline = None
            if self._reaper is not None:
                self._reaper.wait(timeout=60)
                self._reaper = None

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ databases
    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` with ``psql`` (as the client, over TCP); returns its unaligned output."""
        out = subprocess.run(
            [
                self._bin("psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                self.dsn(dbname),
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"psql failed: {out.stderr}")
        return out.stdout.strip()

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (from ``template0``) and return its DSN."""
        if name is None:
            name = f"t{os.getpid()}_{next(self._names)}_{int(time.time() * 1000) % 100000}"
        self.psql(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

"""Three hosts on one machine: Linux network namespaces joined by veth pairs (iproute2's ``ip``).

Topology (a star around the server host; every name carries a unique tag, so that concurrent
runs and leftovers of a killed run never collide)::

    ns "<tag>-s" (server)    lo: 10.77.0.1/32, the server's address
        veth "<tag>s1" 10.77.1.1/24  <->  veth "<tag>r1" 10.77.1.2/24   ns "<tag>-r1" (runner host 1)
        veth "<tag>s2" 10.77.2.1/24  <->  veth "<tag>r2" 10.77.2.2/24   ns "<tag>-r2" (runner host 2)

Each runner host routes 10.77.0.1 through its own link, so traffic only ever goes to the
namespaces' own addresses (nothing leaves the machine; the namespaces have no other route).
:meth:`Hosts.cut` sets the server's end of a runner host's link down: that host's packets are
lost without any error, as when a machine drops off the network; :meth:`Hosts.restore` brings it
back. Everything is created by :func:`hosts` and deleted in its ``finally`` (processes still in a
namespace are killed first, so no namespace outlives the test).

Needs root and ``ip``: :func:`unavailable` says why a test must skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["SERVER_ADDRESS", "Hosts", "hosts", "unavailable"]

SERVER_ADDRESS = "10.77.0.1"


def unavailable() -> str | None:
    """Why network namespaces cannot be used here (``None`` when they can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (ip netns add); CI runs as root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (Debian: apt-get install iproute2)"
    return None


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


class Hosts:
    """The three namespaces of one test (see the module docstring)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.server = f"{tag}-s"
        self.runners = [f"{tag}-r1", f"{tag}-r2"]
        self._links = {self.runners[0]: f"{tag}s1", self.runners[1]: f"{tag}s2"}
        self.created: list[str] = []

    @property
    def namespaces(self) -> list[str]:
        return [self.server, *self.runners]

    def build(self) -> None:
        for ns in self.namespaces:
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.server, "addr", "add", f"{SERVER_ADDRESS}/32", "dev", "lo")
        for n, runner in enumerate(self.runners, start=1):
            server_end, runner_end = f"{self.tag}s{n}", f"{self.tag}r{n}"
            _ip(
                "link", "add", server_end, "netns", self.server,
                "type", "veth", "peer", "name", runner_end, "netns", runner,
            )  # fmt: skip
            _ip("-n", self.server, "addr", "add", f"10.77.{n}.1/24", "dev", server_end)
            _ip("-n", runner, "addr", "add", f"10.77.{n}.2/24", "dev", runner_end)
            _ip("-n", self.server, "link", "set", server_end, "up")
            _ip("-n", runner, "link", "set", runner_end, "up")
            _ip("-n", runner, "route", "add", f"{SERVER_ADDRESS}/32", "via", f"10.77.{n}.1")

    def command(self, ns: str, *argv: str) -> list[str]:
        """``argv`` run inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns, *argv]

    def cut(self, runner: str) -> None:
        """Take ``runner``'s link down at the server's end: its packets are silently lost."""
        _ip("-n", self.server, "link", "set", self._links[runner], "down")

    def restore(self, runner: str) -> None:
        _ip("-n", self.server, "link", "set", self._links[runner], "up")

    def delete(self) -> None:
        """Kill what still runs in the namespaces, then delete them (their veths go with them)."""
        for ns in self.created:
            result = subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30, check=False
            )
            for pid in result.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        errors = []
        for ns in reversed(self.created):
            try:
                _ip("netns", "del", ns)
            except RuntimeError as exc:
                errors.append(str(exc))
        self.created.clear()
        if errors:
            raise RuntimeError("; ".join(errors))


@contextmanager
def hosts() -> Iterator[Hosts]:
    """Build the three namespaces; delete them (and kill anything left in them) on exit."""
    made = Hosts(f"agl{uuid.uuid4().hex[:6]}")  # veth names: at most 15 characters
    try:
        made.build()
        yield made
    finally:
        made.delete()

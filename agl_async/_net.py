"""Addresses: how a host name is bound, how it is reached, and a free port — in one place.

``"localhost"`` is bound as ``127.0.0.1`` (IPv4 loopback, what the clients reach), a wildcard
address (``0.0.0.0``, ``::``) is reached through the loopback address of its family, and IPv6
hosts are bracketed in URLs.
"""

from __future__ import annotations

import ipaddress
import socket

__all__ = ["bind_socket", "free_port", "http_url", "is_loopback"]


def _bind_host(host: str) -> str:
    return "127.0.0.1" if host in ("localhost", "") else host


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def http_url(host: str, port: int, *, bound: bool = False, scheme: str = "http") -> str:
    """``http://host:port`` (``scheme`` ``"https"``: ``https://``). With ``bound``, ``host`` is the
    address a server bound, and the URL is one that reaches it from this machine (see the module
    docstring)."""
    if bound:
        host = _bind_host(host)
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def bind_socket(
    host: str, port: int, *, what: str = "the store server", listen: bool = True, reuse_port: bool = False
) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``port=0``: a free one), listening and non-blocking
    when ``listen``; ``OSError`` naming ``what`` and ``host:port`` when it cannot be bound.
    ``reuse_port``: ``SO_REUSEPORT``, so that sockets of several processes share the address."""
    where = f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(_bind_host(host), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot bind {what} to {where}: {exc}") from exc
    family, type_, proto, _, address = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            if not hasattr(socket, "SO_REUSEPORT"):
                raise OSError("this platform has no SO_REUSEPORT: serve one process per address instead")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        if listen:
            sock.listen(2048)
            sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot bind {what} to {where}: {exc.strerror or exc}") from exc
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (prefer binding ``port=0`` where possible)."""
    with bind_socket(host, 0, listen=False) as sock:
        port: int = sock.getsockname()[1]
        return port

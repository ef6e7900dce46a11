"""The server's secure defaults: no unauthenticated store on a network-facing address, and
certificate files checked before anything binds.

Binding an address that is not loopback without a token would let anyone who can reach the port
read and change the store; :func:`check_bind` refuses it with :class:`UnauthenticatedBindError` (a
``ValueError``) unless the caller opted out explicitly (``allow_unauthenticated=True``,
``agl-async serve --insecure``). :func:`check_certificate` loads the certificate chain and key
the way uvicorn will, so that a wrong path or a key that does not match is a ``ValueError`` naming
the file at construction, not a failure inside the serving task.
"""

from __future__ import annotations

import os
import ssl

from .._net import is_loopback

__all__ = ["UnauthenticatedBindError", "check_bind", "check_certificate"]


class UnauthenticatedBindError(ValueError):
    """A store server on a non-loopback address without a token, and no explicit opt-out."""

    def __init__(self, host: str) -> None:
        self.host = host
        super().__init__(
            f"refusing to serve the store on {host!r} (not a loopback address) without an auth token: "
            "anyone who can reach it could read and change the store. Pass auth_token= (or set the "
            "environment variable AGL_SERVER_TOKEN), or allow_unauthenticated=True to serve it "
            "without one anyway"
        )


def check_bind(host: str, auth_token: str | None, allow_unauthenticated: bool) -> None:
    """Raise :class:`UnauthenticatedBindError` for a non-loopback ``host`` without a token."""
    if not isinstance(allow_unauthenticated, bool):
        raise ValueError(f"allow_unauthenticated must be a boolean, got {allow_unauthenticated!r}")
    # Loopback: ``localhost``, ``127.0.0.0/8``, ``::1`` (and ``""``, which binds 127.0.0.1);
    # anything else — a name, ``0.0.0.0``, ``::``, a LAN address — may be reachable from elsewhere.
    loopback = host == "" or is_loopback(host.strip("[]"))
    if not auth_token and not allow_unauthenticated and not loopback:
        raise UnauthenticatedBindError(host)


def check_certificate(
    certfile: str | os.PathLike[str] | None, keyfile: str | os.PathLike[str] | None
) -> tuple[str | None, str | None]:
    """The paths as strings, after loading them once; ``ValueError`` naming what is wrong."""
    if certfile is None:
        if keyfile is not None:
            raise ValueError("ssl_keyfile needs ssl_certfile (the certificate it belongs to)")
        return None, None
    cert, key = os.fspath(certfile), None if keyfile is None else os.fspath(keyfile)
    for name, path in (("ssl_certfile", cert), ("ssl_keyfile", key)):
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"{name} {path!r} does not exist")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        where = repr(cert) if key is None else f"{cert!r} / {key!r}"
        raise ValueError(f"cannot load the TLS certificate and key {where}: {exc}") from None
    return cert, key

"""How a client-server run reaches its store: scheme, token and TLS settings, in one picklable value.

:class:`Transport` makes the run's :class:`~agl_async.http.server.LightningStoreServer` (token,
certificate, the non-loopback opt-out) and the :class:`~agl_async.http.client.LightningStoreClient`
of every runner (``https://`` when TLS is on, the token, ``verify``), so that runner processes get
exactly what they need to reach the server, through pickling (never the command line). Its
``repr`` never shows the token.
"""

from __future__ import annotations

import os
import ssl
from typing import TYPE_CHECKING, Any

from .._net import http_url
from ..http._security import check_bind, check_certificate
from ..http._tls import Verify, check_verify

if TYPE_CHECKING:
    from ..http.client import LightningStoreClient
    from ..http.server import LightningStoreServer
    from ..store.base import LightningStore

__all__ = ["Transport"]


def _optional_path(name: str, value: str | os.PathLike[str] | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"{name} must be a file path or None, got {value!r}")
    return os.fspath(value)


class Transport:
    """Scheme, token and TLS settings shared by the server and the clients of one run.

    ``auth_token``: ``None`` → env ``AGL_SERVER_TOKEN`` (``""``: none). ``ssl_certfile`` /
    ``ssl_keyfile``: the server's certificate chain and key (the server serves HTTPS).
    ``verify``: how runners verify the server's certificate (httpx's convention; a path or a
    boolean pickles into runner processes, an ``ssl.SSLContext`` does not). ``tls``: whether
    runners connect with ``https://``; ``None`` → when a certificate is given or ``verify`` is a
    CA bundle path or context. ``allow_unauthenticated``: let the server bind a non-loopback
    address without a token.
    """

    def __init__(
        self,
        *,
        auth_token: str | None = None,
        ssl_certfile: str | os.PathLike[str] | None = None,
        ssl_keyfile: str | os.PathLike[str] | None = None,
        verify: Verify = True,
        tls: bool | None = None,
        allow_unauthenticated: bool = False,
    ) -> None:
        if auth_token is None:
            auth_token = os.environ.get("AGL_SERVER_TOKEN") or None
        if auth_token is not None and not isinstance(auth_token, str):
            raise ValueError(f"auth_token must be a string or None, got {type(auth_token).__name__}")
        self.auth_token = auth_token or None
        self.ssl_certfile = _optional_path("ssl_certfile", ssl_certfile)
        self.ssl_keyfile = _optional_path("ssl_keyfile", ssl_keyfile)
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("ssl_keyfile needs ssl_certfile (the certificate it belongs to)")
        self.verify = check_verify(verify)
        if tls is None:
            tls = self.ssl_certfile is not None or isinstance(self.verify, (str, ssl.SSLContext))
        if not isinstance(tls, bool):
            raise ValueError(f"tls must be a boolean or None, got {tls!r}")
        self.tls = tls
        if not isinstance(allow_unauthenticated, bool):
            raise ValueError(f"allow_unauthenticated must be a boolean, got {allow_unauthenticated!r}")
        self.allow_unauthenticated = allow_unauthenticated

    def __repr__(self) -> str:
        token = "<set>" if self.auth_token else None
        return (
            f"Transport(tls={self.tls}, auth_token={token}, ssl_certfile={self.ssl_certfile!r}, "
            f"verify={self.verify!r}, allow_unauthenticated={self.allow_unauthenticated})"
        )

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def endpoint(self, host: str, port: int, *, bound: bool = False) -> str:
        """The URL clients use for ``host:port`` (``bound``: the address a server bound here)."""
        return http_url(host, port, bound=bound, scheme=self.scheme)

    def server_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``LightningStoreServer`` (only those that differ from its defaults,
        except the token, which is always explicit so that the server and its clients agree)."""
        kwargs: dict[str, Any] = {"auth_token": self.auth_token or ""}
        if self.ssl_certfile is not None:
            kwargs["ssl_certfile"] = self.ssl_certfile
        if self.ssl_keyfile is not None:
            kwargs["ssl_keyfile"] = self.ssl_keyfile
        if self.allow_unauthenticated:
            kwargs["allow_unauthenticated"] = True
        return kwargs

    def check_server(self, host: str) -> None:
        """Raise the ``ValueError`` that a server on ``host`` with these settings would raise (for
        a server that a child process will start)."""
        check_bind(host, self.auth_token, self.allow_unauthenticated)
        check_certificate(self.ssl_certfile, self.ssl_keyfile)

    def server(self, store: LightningStore, host: str, port: int) -> LightningStoreServer:
        from ..http.server import LightningStoreServer

        return LightningStoreServer(store, host, port, **self.server_kwargs())

    def client(self, endpoint: str) -> LightningStoreClient:
        """A client of ``endpoint`` (its scheme is made to match ``tls``)."""
        from ..http.client import LightningStoreClient

        _, sep, rest = endpoint.partition("://")
        if sep:
            endpoint = f"{self.scheme}://{rest}"
        return LightningStoreClient(endpoint, self.auth_token or "", self.verify)

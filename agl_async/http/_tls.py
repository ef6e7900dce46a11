"""TLS settings of the store client: httpx's ``verify`` convention, checked early and made picklable,
and the classification of TLS failures into errors that are reported at once instead of retried.

``verify`` is what httpx takes: ``True`` (the default trust store), ``False`` (no verification),
a CA bundle path (a PEM file, or a directory of hashed certificates as OpenSSL's ``capath``), or
an :class:`ssl.SSLContext`. A path is checked to exist when the client is made, and turned into an
``SSLContext`` once per process on first use (httpx 0.28 deprecates plain path strings). A client
configured with an ``SSLContext`` does not pickle (an ``SSLContext`` cannot cross into another
process): give runner processes the CA bundle path instead.

A certificate that does not verify, a handshake with a server that does not speak TLS, and a
plain ``http://`` request to a port that speaks TLS are permanent misconfigurations: the client
raises :class:`~agl_async.http.client.StoreTLSError` on the first occurrence, naming the endpoint,
rather than spending its retry budget on them.
"""

from __future__ import annotations

import os
import ssl
from typing import Union

import anyio

__all__ = ["Verify", "check_verify", "describe_tls_failure", "speaks_tls", "ssl_context_of"]

#: httpx's ``verify`` argument.
Verify = Union[bool, str, "os.PathLike[str]", ssl.SSLContext]


def check_verify(verify: object) -> bool | str | ssl.SSLContext:
    """Validate ``verify`` (``ValueError`` saying what is wrong); a path comes back as ``str``."""
    if isinstance(verify, (bool, ssl.SSLContext)):
        return verify
    if isinstance(verify, (str, os.PathLike)):
        path = os.fspath(verify)
        if not path:
            raise ValueError("verify must be True, False, a CA bundle path or an ssl.SSLContext, got ''")
        if not os.path.exists(path):
            raise ValueError(f"verify: CA bundle {path!r} does not exist")
        return path
    raise ValueError(
        f"verify must be True, False, a CA bundle path or an ssl.SSLContext, got {type(verify).__name__}"
    )


def ssl_context_of(verify: bool | str | ssl.SSLContext) -> bool | ssl.SSLContext:
    """What to hand httpx: booleans and contexts as they are, a path as a verifying context.

    Raises ``ValueError`` naming the path when it holds no usable certificate."""
    if not isinstance(verify, str):
        return verify
    try:
        if os.path.isdir(verify):
            return ssl.create_default_context(capath=verify)
        return ssl.create_default_context(cafile=verify)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"verify: cannot load CA bundle {verify!r}: {exc}") from None


def _ssl_error_in(exc: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


#: OpenSSL reasons that mean "these two ends cannot talk TLS as configured": a peer that does not
#: speak TLS, no protocol version or cipher in common, a certificate the peer rejects.
_MISCONFIGURED = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "HTTP_REQUEST",
        "HTTPS_PROXY_REQUEST",
        "UNSUPPORTED_PROTOCOL",
        "NO_PROTOCOLS_AVAILABLE",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
        "NO_SHARED_CIPHER",
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    }
)


def describe_tls_failure(exc: BaseException) -> str | None:
    """Why a connection failed, when the failure is a TLS misconfiguration that no retry will cure
    (an untrusted or mismatched certificate, a peer that does not speak TLS); ``None`` for anything
    else — in particular a handshake cut short or timed out (EOF, "did not complete", a system call
    error), which a network outage or a restarting server causes and a retry may cure."""
    error = _ssl_error_in(exc)
    if error is None:
        return None
    if isinstance(error, ssl.SSLCertVerificationError):
        reason = getattr(error, "verify_message", None) or getattr(error, "reason", None) or str(error)
        return (
            f"the server's certificate does not verify ({reason}); trust its CA with "
            "verify='<CA bundle path>' (agl-async runner --ca-file)"
        )
    reason = str(getattr(error, "reason", None) or "")
    if reason not in _MISCONFIGURED:
        return None
    if reason == "WRONG_VERSION_NUMBER":
        return f"the server does not speak TLS ({reason}); is it serving plain http:// ?"
    return f"TLS handshake failed: {error}"


async def speaks_tls(host: str, port: int, timeout: float) -> bool:
    """Whether ``host:port`` completes a TLS handshake (certificate not checked), within ``timeout``.

    Used only after a plain-HTTP request got no answer at all, to tell "this port speaks HTTPS"
    apart from a server that went away."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with anyio.move_on_after(timeout):
        try:
            stream = await anyio.connect_tcp(host, port, ssl_context=context, tls_standard_compatible=False)
        except (OSError, anyio.BrokenResourceError, anyio.EndOfStream):
            return False
        await stream.aclose()
        return True
    return False

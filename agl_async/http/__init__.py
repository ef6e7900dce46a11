"""HTTP transport of the store: a starlette server on uvicorn and an httpx client.

The wire protocol (one ``POST /v1/<method>`` per store method, msgspec-validated bodies) is in
:mod:`agl_async.http.protocol`; the server in :mod:`agl_async.http.server`; the client in
:mod:`agl_async.http.client`.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .client import LightningStoreClient, StoreAuthError, StoreConnectionError, StoreTLSError
    from .server import LightningStoreServer

# Imported on first access (PEP 562): runner processes need the client only, not the server's
# uvicorn and starlette.
_LAZY = {
    "LightningStoreClient": ".client",
    "StoreAuthError": ".client",
    "StoreConnectionError": ".client",
    "StoreTLSError": ".client",
    "LightningStoreServer": ".server",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "LightningStoreClient",
    "LightningStoreServer",
    "StoreAuthError",
    "StoreConnectionError",
    "StoreTLSError",
]

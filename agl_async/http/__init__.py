"""HTTP transport of the store: a starlette server on uvicorn and an httpx client.

The wire protocol (one ``POST /v1/<method>`` per store method, msgspec-validated bodies) is in
:mod:`agl_async.http.protocol`; the server in :mod:`agl_async.http.server`; the client in
:mod:`agl_async.http.client`.
"""

from .client import LightningStoreClient, StoreAuthError, StoreConnectionError
from .server import LightningStoreServer

__all__ = ["LightningStoreClient", "LightningStoreServer", "StoreAuthError", "StoreConnectionError"]

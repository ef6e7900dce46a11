"""HTTP transport of the store: a starlette server on uvicorn and an httpx client."""

"""A tiny OpenAI-compatible chat server on 127.0.0.1, for the traced example and for tests.

``POST /v1/chat/completions`` answers arithmetic questions ("What is 17 + 25?") in the shape of
OpenAI's Chat Completions API, with ``usage`` token counts (words, here). Its "model" is
deterministic: told to think step by step (in the system message) it writes out the sum and is
always right; otherwise it answers tersely and is off by one whenever the sum is a multiple of 3.
``GET /v1/models`` lists the one model. No network beyond the loopback, no API key.

Lifecycle: ``async with MockOpenAI() as llm:`` binds a free port (``llm.endpoint``), serves as a
task of the running asyncio loop, and on exit stops serving and waits for that task; cancelling
the block cancels the task. SIGINT/SIGTERM are left to the host application.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import Generator
from types import TracebackType

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

__all__ = ["MODEL", "MockOpenAI", "answer", "app"]

MODEL = "mock-arithmetic-1"
_QUESTION = re.compile(r"(-?\d+)\s*\+\s*(-?\d+)")


def answer(system: str, question: str) -> str:
    """What the mock model says to ``question`` under the ``system`` prompt."""
    match = _QUESTION.search(question)
    if match is None:
        return "I can only add two numbers."
    a, b = int(match.group(1)), int(match.group(2))
    if "step by step" in system.lower():
        return f"First I add {a} and {b}. {a} + {b} = {a + b}. The answer is {a + b}."
    return f"The answer is {a + b + (1 if (a + b) % 3 == 0 else 0)}."


def _tokens(text: str) -> int:
    return len(text.split())


async def _chat_completions(request: Request) -> JSONResponse:
    try:
        body = await request.json()
        messages = body["messages"]
        system = " ".join(m.get("content", "") for m in messages if m.get("role") == "system")
        question = next(m.get("content", "") for m in reversed(messages) if m.get("role") == "user")
    except (ValueError, KeyError, TypeError, StopIteration, AttributeError):
        return JSONResponse(
            {"error": {"message": "expected a chat completion request", "type": "invalid"}}, 400
        )
    content = answer(system, question)
    prompt_tokens = sum(_tokens(str(m.get("content", ""))) for m in messages)
    completion_tokens = _tokens(content)
    return JSONResponse(
        {
            "id": f"chatcmpl-mock-{time.monotonic_ns()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or MODEL,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    )


async def _models(request: Request) -> JSONResponse:
    return JSONResponse(
        {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "agl-async"}]}
    )


#: The ASGI application (mountable elsewhere, e.g. in a test's own server).
app = Starlette(
    routes=[
        Route("/v1/chat/completions", _chat_completions, methods=["POST"]),
        Route("/v1/models", _models, methods=["GET"]),
    ]
)


class _Server(uvicorn.Server):
    """uvicorn without signal capture, telling when startup is over."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.startup_done = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            self.startup_done.set()


class MockOpenAI:
    """Serve :data:`app` on ``host`` (a free port) while the ``async with`` block runs (asyncio)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def endpoint(self) -> str:
        """The base URL of the OpenAI-compatible API (``…/v1``)."""
        return f"http://{self.host}:{self.port}/v1"

    async def __aenter__(self) -> MockOpenAI:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, lifespan="off", log_config=None, log_level="warning", access_log=False)
        self._server = server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        ready = asyncio.ensure_future(server.startup_done.wait())
        try:
            await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if not server.started:
            sock.close()
            await self._task  # re-raises the startup error
            raise RuntimeError("the mock OpenAI server did not start")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        server, task = self._server, self._task
        self._server = self._task = None
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            await task
        finally:
            if not task.done():
                task.cancel()

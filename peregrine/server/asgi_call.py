"""One HTTP request through an ASGI app in this process, its response as the ASGI messages the
app sends: how a replica runs the server's own routes for a request its ingress forwarded."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message


@dataclass
class ForwardedRequest:
    """What an ingress passes on of an HTTP request (picklable)."""

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None

    def scope(self) -> dict[str, Any]:
        """The ASGI HTTP scope of the request."""
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
                "http_version": "1.1", "method": self.method, "scheme": "http",
                "path": self.path, "raw_path": self.path.encode("latin-1"),
                "root_path": "", "query_string": self.query_string,
                "headers": list(self.headers), "client": self.client,
                "server": ("127.0.0.1", 0), "state": {}}


async def call_app(app: ASGIApp, request: ForwardedRequest) -> AsyncIterator[Message]:
    """Run `request` through `app`, yielding the response's messages (start, then body
    chunks) as the app sends them; closing the iterator early tells the app the client
    went away (http.disconnect), as a dropped connection would."""
    sent: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_given = False

    async def receive() -> Message:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await sent.put(message)

    async def run() -> None:
        try:
            await app(request.scope(), receive, send)
        finally:
            await sent.put(None)

    task = asyncio.ensure_future(run())
    try:
        while (message := await sent.get()) is not None:
            yield message
        await task  # re-raise what the app raised
    finally:
        gone.set()
        if not task.done():
            # The app sees the disconnect and aborts its engine requests; give it a moment.
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), 5.0)
            task.cancel()

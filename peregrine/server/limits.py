"""Limits applied before a request reaches a route: the body's size (413 as soon as it is
known to be too big) and the shape of its JSON (nesting depth, valid Unicode)."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from peregrine.server.errors import APIError, error_response


class BodySizeLimit:
    """ASGI middleware: a body over `max_bytes` gets 413 in OpenAI's shape, from the
    Content-Length header before any of it is read, or as soon as a chunked body passes the
    limit; the route then never sees it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> Any:
        return error_response(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              f"the request body is {size} bytes; the limit is "
                              f"{self.max_bytes} (--max-request-bytes)", param=None,
                              code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(declared.decode())(scope, receive, send)
            return
        # Read the whole body here (the routes read it whole anyway), counting as it comes.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before the end
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(f"more than {self.max_bytes}")(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for the disconnect, as routes expect

        await self.app(scope, replay, send)


def check_json(data: Any, max_depth: int) -> None:
    """400 naming the place (`messages.0.content`) of the first string that is not valid
    Unicode (a lone surrogate escape such as "\\ud800"), or when the JSON nests deeper than
    `max_depth`. Iterative: a deep document cannot exhaust the stack here."""
    if isinstance(data, str):
        _check_text(data, ())
    stack: list[tuple[Any, tuple[str, ...]]] = [(data, ())]
    while stack:
        node, path = stack.pop()
        if len(path) >= max_depth:
            raise APIError(HTTPStatus.BAD_REQUEST, f"the request JSON nests deeper than "
                           f"{max_depth} levels", param=_param(path) or None,
                           code="invalid_json")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(key, str):
                _check_text(key, path)
            # Numbers (most of a token-id prompt) need no look; strings are checked here.
            if isinstance(value, str):
                _check_text(value, (*path, str(key)))
            elif isinstance(value, (dict, list)):
                stack.append((value, (*path, str(key))))


def _check_text(text: str, path: tuple[str, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(HTTPStatus.BAD_REQUEST, f"{_param(path) or 'the request'} is not valid "
                       f"Unicode: a lone surrogate (U+{ord(text[e.start]):04X}) at character "
                       f"{e.start}", param=_param(path) or None, code="invalid_encoding") from None


def _param(path: tuple[str, ...]) -> str:
    return ".".join(path)

"""What an ingress relaying a replica's response needs to know about it: whether a streamed
chunk has given the client anything yet (until then a request may go to another replica),
and the event that ends a stream whose replica died."""

from __future__ import annotations

import json
from typing import Any


def is_event_stream(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the response's headers say server-sent events."""
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
               for k, v in headers)


def _is_lead(event: dict[str, Any]) -> bool:
    """A chat stream's opening chunk: every choice's delta is the role and empty content."""
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    for c in choices:
        if not isinstance(c, dict) or c.get("finish_reason") is not None \
                or c.get("logprobs") is not None:
            return False
        delta = c.get("delta")
        if not isinstance(delta, dict) or delta.get("content") or delta.get("tool_calls") \
                or set(delta) - {"role", "content"}:
            return False
    return True


def carries_output(chunk: bytes) -> bool:
    """Whether an SSE body chunk gives the client anything a retry could not give it again
    identically: anything but the opening role chunk of a chat stream."""
    for line in chunk.split(b"\n"):
        if not line.startswith(b"data:"):
            if line.strip():
                return True  # `event:` lines (Anthropic's, Responses') open real events
            continue
        payload = line[5:].strip()
        try:
            event = json.loads(payload)
        except ValueError:
            return True  # [DONE] or anything else we cannot read
        if not isinstance(event, dict) or not _is_lead(event):
            return True
    return False


def broken_stream_event(path: str, message: str) -> bytes:
    """The SSE that ends a stream cut short, in the wire format of the API at `path`."""
    if path.startswith("/v1/messages"):
        data = {"type": "error", "error": {"type": "api_error", "message": message}}
        return f"event: error\ndata: {json.dumps(data)}\n\n".encode()
    if path.startswith("/v1/responses"):
        data = {"type": "error", "code": "replica_died", "message": message, "param": None}
        return f"event: error\ndata: {json.dumps(data)}\n\n".encode()
    data = {"error": {"message": message, "type": "server_error", "param": None,
                      "code": "replica_died"}}
    return f"data: {json.dumps(data)}\n\ndata: [DONE]\n\n".encode()

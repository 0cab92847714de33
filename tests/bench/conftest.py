"""A small OpenAI-style streaming server for the serving benchmark's client tests: real HTTP
and SSE on 127.0.0.1, with known chunks, so the client's measurements can be checked
exactly. Its `model` field picks a behaviour: "fake-model" streams one chunk per token and
sends usage when asked; "no-usage" sends none and ends with finish_reason "length";
"stop-early" sends none and ends with "stop"; "closing-chunk" streams its tokens without a
finish_reason and then, as llama-server does, a closing chunk with empty text, the
finish_reason and usage. The prompt "fail" gets HTTP 400."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest


def _app():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "fake-model"}]})

    async def completions(request):
        body = await request.json()
        if body.get("prompt") == "fail":
            return JSONResponse({"error": {"message": "bad prompt"}}, status_code=400)
        n, mode = body["max_tokens"], body["model"]
        chat = request.url.path.endswith("chat/completions")

        async def stream():
            if chat:
                yield 'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n'
            for i in range(n):
                await asyncio.sleep(0.005)
                last = i == n - 1 and mode != "closing-chunk"
                finish = ("length" if mode != "stop-early" else "stop") if last else None
                choice = ({"delta": {"content": f"t{i} "}} if chat else {"text": f"t{i} "})
                yield "data: " + json.dumps({"choices": [{**choice, "finish_reason": finish}]}) \
                    + "\n\n"
            if mode == "closing-chunk":
                await asyncio.sleep(0.005)
                yield "data: " + json.dumps({"choices": [{"text": "", "finish_reason": "length"}],
                                             "usage": {"completion_tokens": n}}) + "\n\n"
            if mode == "fake-model" and body.get("stream_options", {}).get("include_usage"):
                prompt = body.get("prompt") or body["messages"][0]["content"]
                yield "data: " + json.dumps({"choices": [], "usage": {
                    "prompt_tokens": len(prompt) if isinstance(prompt, list) else 3,
                    "completion_tokens": n}}) + "\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(stream(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models),
                             Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/chat/completions", completions, methods=["POST"])])


@pytest.fixture(scope="session")
def fake_server():
    """Base URL of the server, running in a thread for the whole session."""
    import uvicorn

    from peregrine.bench.launch import free_port
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_app(), host="127.0.0.1", port=port,
                                           log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)

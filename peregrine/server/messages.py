"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`) on the chat path:
a Messages request becomes a chat request (system, text, tool_use and tool_result blocks,
tools and tool_choice mapped to their OpenAI twins), runs through the same engine path, and
its output becomes content blocks, or Anthropic's streaming events."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from peregrine.engine.async_engine import RequestFailedError
from peregrine.outputs import CompletionOutput
from peregrine.server import serving
from peregrine.server.anthropic_protocol import (AnthropicError, AnthropicErrorInfo,
                                                 AnthropicMessage, AnthropicTool,
                                                 AnthropicToolChoice, CountTokensRequest,
                                                 CountTokensResponse, MessagesRequest,
                                                 MessagesResponse, TextBlock, ToolResultBlock,
                                                 ToolUseBlock, Usage)
from peregrine.server.errors import APIError
from peregrine.server.protocol import ChatCompletionRequest, ChatMessage, ChatTool

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 503: "overloaded_error"}


def error_response(e: APIError) -> JSONResponse:
    """An APIError in Anthropic's shape (the param named in the message)."""
    message = f"{e.param}: {e.message}" if e.param and e.param not in e.message else e.message
    body = AnthropicError(error=AnthropicErrorInfo(
        type=_ERROR_TYPES.get(e.status, "api_error"), message=message))
    return JSONResponse(body.model_dump(), status_code=e.status, headers=e.headers)


def _text(blocks: str | list[TextBlock] | None) -> str | None:
    if blocks is None or isinstance(blocks, str):
        return blocks
    return "\n".join(b.text for b in blocks)


def chat_messages(system: str | list[TextBlock] | None,
                  messages: list[AnthropicMessage]) -> list[ChatMessage]:
    """Messages as the chat path takes them: tool_use blocks become an assistant's
    tool_calls, tool_result blocks become tool messages."""
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": _text(system)})
    for m in messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        texts = [b.text for b in m.content if isinstance(b, TextBlock)]
        calls = [{"id": b.id, "type": "function",
                  "function": {"name": b.name, "arguments": json.dumps(b.input)}}
                 for b in m.content if isinstance(b, ToolUseBlock)]
        for b in m.content:
            if isinstance(b, ToolResultBlock):
                out.append({"role": "tool", "tool_call_id": b.tool_use_id,
                            "content": ("error: " if b.is_error else "") + (_text(b.content)
                                                                           or "")})
        if texts or calls:
            out.append({"role": m.role, "content": "\n".join(texts) or None,
                        **({"tool_calls": calls} if calls else {})})
    return [ChatMessage.model_validate(m) for m in out]


def chat_tools(tools: list[AnthropicTool] | None) -> list[ChatTool] | None:
    if not tools:
        return None
    return [ChatTool.model_validate({"type": "function", "function": {
        "name": t.name, **({"description": t.description} if t.description else {}),
        "parameters": t.input_schema}}) for t in tools]


def _tool_choice(choice: AnthropicToolChoice | None) -> Any:
    if choice is None:
        return None
    if choice.type == "tool":
        if not choice.name:
            raise APIError(HTTPStatus.BAD_REQUEST, "tool_choice of type tool needs a name",
                           param="tool_choice")
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def chat_request(req: MessagesRequest) -> ChatCompletionRequest:
    """The chat request a Messages request runs as."""
    fields: dict[str, Any] = {
        "model": req.model, "max_tokens": req.max_tokens, "stream": req.stream,
        "stop": req.stop_sequences, "temperature": req.temperature, "top_p": req.top_p,
        "top_k": req.top_k, "tool_choice": _tool_choice(req.tool_choice),
        "parallel_tool_calls": not (req.tool_choice and
                                    req.tool_choice.disable_parallel_tool_use)}
    chat = ChatCompletionRequest.model_validate(
        {"messages": [], **{k: v for k, v in fields.items() if v is not None}})
    chat.messages = chat_messages(req.system, req.messages)
    chat.tools = chat_tools(req.tools)
    return chat


def _stop(o: CompletionOutput, called: bool) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence of an output."""
    if called:
        return "tool_use", None
    if o.finish_reason == "length":
        return "max_tokens", None
    if isinstance(o.stop_reason, str):
        return "stop_sequence", o.stop_reason
    return "end_turn", None


async def create_message(ctx: serving.ServingContext, req: MessagesRequest,
                         request: Request) -> Response:
    """POST /v1/messages."""
    run = await serving.start_chat(ctx, chat_request(req), f"msg_{uuid.uuid4().hex[:24]}")
    if req.stream:
        return serving.EngineStreamingResponse(_events(ctx, req, run), ctx, run.streams)
    out = (await serving.collect(ctx, request, run.streams))[0]
    o = out.outputs[0]
    message, called = run.use.message(o.text)
    content: list[dict[str, Any]] = []
    if message.content:
        content.append({"type": "text", "text": message.content})
    for call in message.tool_calls or []:
        content.append({"type": "tool_use", "id": call.id, "name": call.function.name,
                        "input": json.loads(call.function.arguments)})
    stop_reason, stop_sequence = _stop(o, called)
    body = MessagesResponse(id=run.base_id, content=content, model=req.model,
                            stop_reason=stop_reason, stop_sequence=stop_sequence,
                            usage=Usage(input_tokens=len(out.prompt_token_ids),
                                        output_tokens=len(o.token_ids)))
    return JSONResponse(body.model_dump())


def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


async def _events(ctx: serving.ServingContext, req: MessagesRequest,
                  run: serving.ChatRun) -> AsyncIterator[str]:
    """Anthropic's stream: message_start, then per content block a start, deltas (text or
    input JSON) and a stop, then message_delta (stop reason, usage) and message_stop."""
    yield _event("message_start", {"message": {
        "id": run.base_id, "type": "message", "role": "assistant", "content": [],
        "model": req.model, "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": len(run.prompt.token_ids), "output_tokens": 0}}})
    parser = run.use.stream_parser()
    block = -1           # index of the open content block
    open_kind = None     # "text" or the call index it streams
    sent, last = 0, None
    try:
        async for _, out in serving.merge_streams(run.streams):
            last = out
            o = out.outputs[0]
            new, sent = o.text[sent:], len(o.text)
            if parser is None:
                pieces: list[tuple[str, Any]] = [("text", new)] if new else []
            else:
                d = parser.feed(new, o.finished)
                pieces = ([("text", d.content)] if d.content else []) + \
                    [("call", t) for t in d.tool_calls]
            for kind, piece in pieces:
                if kind == "text":
                    if open_kind != "text":
                        if block >= 0:
                            yield _event("content_block_stop", {"index": block})
                        block, open_kind = block + 1, "text"
                        yield _event("content_block_start", {"index": block, "content_block":
                                                             {"type": "text", "text": ""}})
                    yield _event("content_block_delta", {"index": block, "delta": {
                        "type": "text_delta", "text": piece}})
                    continue
                if "id" in piece:  # a new call: its own block
                    if block >= 0:
                        yield _event("content_block_stop", {"index": block})
                    block, open_kind = block + 1, piece["index"]
                    yield _event("content_block_start", {"index": block, "content_block": {
                        "type": "tool_use", "id": piece["id"],
                        "name": piece["function"]["name"], "input": {}}})
                if piece["function"]["arguments"]:
                    yield _event("content_block_delta", {"index": block, "delta": {
                        "type": "input_json_delta",
                        "partial_json": piece["function"]["arguments"]}})
    except (RequestFailedError, APIError) as e:
        yield _event("error", {"error": {"type": "api_error", "message": str(e)}})
        return
    if block >= 0:
        yield _event("content_block_stop", {"index": block})
    o = last.outputs[0] if last is not None else None
    stop_reason, stop_sequence = _stop(o, parser is not None and parser.called) \
        if o is not None else ("end_turn", None)
    yield _event("message_delta", {"delta": {"stop_reason": stop_reason,
                                             "stop_sequence": stop_sequence},
                                   "usage": {"output_tokens": len(o.token_ids) if o else 0}})
    yield _event("message_stop", {})


async def count_tokens(ctx: serving.ServingContext, req: CountTokensRequest) -> JSONResponse:
    """POST /v1/messages/count_tokens: the prompt's tokens, as a Messages request renders it."""
    ctx.check_model(req.model)
    prompt = await serving.render_chat(ctx, chat_messages(req.system, req.messages), True,
                                       capped=False, tools=chat_tools(req.tools))
    return JSONResponse(CountTokensResponse(input_tokens=len(prompt.token_ids)).model_dump())

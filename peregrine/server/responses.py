"""OpenAI's Responses API (`/v1/responses`) on the chat path: a Responses request (with the
history of `previous_response_id` put in front) becomes a chat request, runs through the
same engine path, and its output becomes output items (a message, function calls), or the
Responses streaming events. Stored responses live in a bounded in-memory store."""

from __future__ import annotations

import itertools
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from peregrine.engine.async_engine import RequestFailedError
from peregrine.outputs import CompletionOutput, RequestOutput
from peregrine.server import serving
from peregrine.server.errors import APIError, bad_request
from peregrine.server.protocol import ChatCompletionRequest, ChatMessage, ChatTool
from peregrine.server.responses_protocol import (IncompleteDetails, InputItemList,
                                                 InputTokensDetails, OutputFunctionCall,
                                                 OutputMessage, OutputText, ResponseDeleted,
                                                 ResponseObject, ResponsesRequest,
                                                 ResponseUsage)

logger = logging.getLogger("peregrine.server")

# The chat request's fields that carry a Responses request's, for errors' `param`.
_PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens",
           "max_tokens": "max_output_tokens", "response_format": "text.format"}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class StoredResponse:
    """A stored response: its body, its own input items, and the whole conversation it saw
    (the history before it, then its input; `instructions` excluded)."""

    body: dict[str, Any]
    input: list[dict[str, Any]]
    context: list[dict[str, Any]]

    def history(self) -> list[dict[str, Any]]:
        """What a follow-up continues: the conversation, then this response's output."""
        return self.context + self.body["output"]


class ResponseStore:
    """The last `capacity` stored responses (least recently used go first); per server, in
    memory."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, response_id: str, stored: StoredResponse) -> None:
        if self.capacity <= 0:
            return
        self._items[response_id] = stored
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        """The stored response; a 404 naming `param` when unknown (or evicted)."""
        stored = self._items.get(response_id)
        if stored is None:
            raise APIError(HTTPStatus.NOT_FOUND, f"Response with id '{response_id}' not found "
                           "(it was not stored, was deleted, or was evicted from the "
                           "--responses-store-size most recent)", param=param,
                           code="response_not_found")
        self._items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> None:
        self.get(response_id, "response_id")
        del self._items[response_id]

    def __len__(self) -> int:
        return len(self._items)


# --- the request --------------------------------------------------------------------------------
def input_items(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as item dicts, each with an id (a string is one user message)."""
    if isinstance(req.input, str):
        return [{"type": "message", "id": _new_id("msg"), "role": "user",
                 "content": [{"type": "input_text", "text": req.input}]}]
    prefixes = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}
    items = []
    for item in req.input:
        data = item.model_dump(exclude_none=True)
        data.setdefault("id", _new_id(prefixes[item.type]))
        items.append(data)
    return items


def _text(content: str | list[dict[str, Any]]) -> str:
    return content if isinstance(content, str) else "\n".join(p["text"] for p in content)


def chat_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[ChatMessage]:
    """Items as the chat path takes them: function calls join the assistant message before
    them (parallel calls: one message), their outputs become tool messages."""
    out: list[dict[str, Any]] = []
    if instructions:
        out.append({"role": "system", "content": instructions})
    for item in items:
        if item["type"] == "message":
            out.append({"role": item["role"], "content": _text(item["content"])})
        elif item["type"] == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": _text(item["output"])})
    return [ChatMessage.model_validate(m) for m in out]


def chat_request(req: ResponsesRequest, messages: list[ChatMessage]) -> ChatCompletionRequest:
    """The chat request a Responses request runs as."""
    choice: Any = req.tool_choice
    if choice is not None and not isinstance(choice, str):
        choice = {"type": "function", "function": {"name": choice.name}}
    fields: dict[str, Any] = {
        "model": req.model, "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature, "top_p": req.top_p, "stream": req.stream,
        "tool_choice": choice, "parallel_tool_calls": req.parallel_tool_calls,
        "user": req.user, "truncation": req.truncation}
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise bad_request("text.format of type json_schema needs a schema", "text.format")
        fields["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name or "response", "schema": fmt.schema_,
            "strict": bool(fmt.strict)}}
    elif fmt is not None:
        fields["response_format"] = {"type": fmt.type}
    chat = ChatCompletionRequest.model_validate(
        {"messages": [], **{k: v for k, v in fields.items() if v is not None}})
    chat.messages = messages
    if req.tools:
        chat.tools = [ChatTool.model_validate({"type": "function", "function": {
            k: v for k, v in t.model_dump().items() if k != "type" and v is not None}})
            for t in req.tools]
    return chat


def _echo(req: ResponsesRequest) -> dict[str, Any]:
    """The request's settings as a response repeats them."""
    choice = req.tool_choice or "auto"
    return {"instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id, "store": req.store,
            "temperature": req.temperature, "top_p": req.top_p, "user": req.user,
            "metadata": req.metadata or {},
            "text": {"format": (req.text.format.model_dump(by_alias=True, exclude_none=True)
                                if req.text else {"type": "text"})},
            "tool_choice": choice if isinstance(choice, str) else choice.model_dump(),
            "tools": [t.model_dump() for t in req.tools or []]}


async def _start(ctx: serving.ServingContext, store: ResponseStore, req: ResponsesRequest
                 ) -> tuple[serving.ChatRun, list[dict[str, Any]], list[dict[str, Any]]]:
    """Validate and submit: the run, the request's own items and the whole conversation."""
    history = store.get(req.previous_response_id, "previous_response_id").history() \
        if req.previous_response_id else []
    items = input_items(req)
    if not items and not history:
        raise bad_request("input must not be empty", "input")
    context = history + items
    try:
        run = await serving.start_chat(ctx, chat_request(req, chat_messages(req.instructions,
                                                                            context)),
                                       _new_id("resp"))
    except APIError as e:  # name this API's fields, not the chat request's
        if e.param in ("max_tokens", "max_completion_tokens"):
            e.message = e.message.replace(e.param, "max_output_tokens")
        e.param = _PARAMS.get(e.param or "", e.param)
        raise
    return run, items, context


# --- the response -------------------------------------------------------------------------------
def _status(o: CompletionOutput | None) -> tuple[str, dict[str, Any] | None]:
    """The response's status and incomplete_details."""
    if o is None or o.finish_reason == "stop":
        return "completed", None
    reason = "max_output_tokens" if o.finish_reason == "length" else None
    return "incomplete", IncompleteDetails(reason=reason).model_dump()


def _usage(out: RequestOutput | None) -> dict[str, Any] | None:
    if out is None:
        return None
    prompt, completion = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
    return ResponseUsage(input_tokens=prompt, output_tokens=completion,
                         total_tokens=prompt + completion,
                         input_tokens_details=InputTokensDetails(
                             cached_tokens=out.num_cached_tokens)).model_dump()


def _body(ctx: serving.ServingContext, req: ResponsesRequest, response_id: str,
          status: str, details: dict[str, Any] | None, output: list[dict[str, Any]],
          usage: dict[str, Any] | None, created_at: int | None = None) -> dict[str, Any]:
    return ResponseObject.model_validate({
        "id": response_id, "created_at": created_at or int(time.time()),
        "model": ctx.model_name, "status": status,
        "incomplete_details": details, "output": output, "usage": usage,
        **_echo(req), "truncation": req.truncation or ctx.args.chat_truncation}).model_dump()


def _message(text: str, status: str) -> dict[str, Any]:
    return OutputMessage(id=_new_id("msg"), status=status,
                         content=[OutputText(text=text)]).model_dump()


def _function_call(call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return OutputFunctionCall(id=_new_id("fc"), call_id=call_id, name=name,
                              arguments=arguments, status=status).model_dump()


async def create_response(ctx: serving.ServingContext, store: ResponseStore,
                          req: ResponsesRequest, request: Request) -> Response:
    """POST /v1/responses."""
    run, items, context = await _start(ctx, store, req)
    keep = _keeper(store, req, items, context)
    if req.stream:
        return serving.EngineStreamingResponse(_events(ctx, req, run, keep), ctx, run.streams)
    out = (await serving.collect(ctx, request, run.streams))[0]
    o = out.outputs[0]
    status, details = _status(o)
    message, _ = run.use.message(o.text)
    calls = message.tool_calls or []
    item_status = "incomplete" if status == "incomplete" else "completed"
    output = []
    # A text answer always has its message; whitespace around calls is not one.
    if (message.content and message.content.strip()) or not calls:
        output.append(_message(message.content or "", item_status))
    output += [_function_call(c.id, c.function.name, c.function.arguments, "completed")
               for c in calls]
    body = _body(ctx, req, run.base_id, status, details, output, _usage(out))
    keep(body)
    return JSONResponse(body)


def _keeper(store: ResponseStore, req: ResponsesRequest, items: list[dict[str, Any]],
            context: list[dict[str, Any]]) -> Callable[[dict[str, Any]], None]:
    """What to do with a finished response's body: store it, unless `store` is false."""
    def keep(body: dict[str, Any]) -> None:
        if req.store:
            store.put(body["id"], StoredResponse(body, items, context))
    return keep


# --- streaming ----------------------------------------------------------------------------------
class _EventWriter:
    """Server-sent events with `event:` names and a growing sequence_number."""

    def __init__(self) -> None:
        self._seq = itertools.count()

    def __call__(self, kind: str, **data: Any) -> str:
        payload = {"type": kind, "sequence_number": next(self._seq), **data}
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _events(ctx: serving.ServingContext, req: ResponsesRequest, run: serving.ChatRun,
                  keep: Callable[[dict[str, Any]], None]) -> AsyncIterator[str]:
    """The Responses stream: response.created and .in_progress; per output item its
    .added, its deltas (text in a content part, or call arguments) and its .done; then
    response.completed (or response.incomplete). A failure ends it with an error event."""
    event = _EventWriter()
    output: list[dict[str, Any]] = []
    opened: dict[str, Any] | None = None  # the item the deltas go to
    pending = ""  # text held back while it is only whitespace (it may precede a call)

    created_at = int(time.time())

    def body(status: str, details: dict[str, Any] | None = None,
             usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return _body(ctx, req, run.base_id, status, details, output, usage, created_at)

    def open_message() -> list[str]:
        nonlocal opened
        opened = {"type": "message", "id": _new_id("msg"), "role": "assistant",
                  "status": "in_progress", "content": []}
        output.append(opened)
        index = len(output) - 1
        part = {"type": "output_text", "text": "", "annotations": []}
        added = [event("response.output_item.added", output_index=index, item=opened),
                 event("response.content_part.added", output_index=index,
                       item_id=opened["id"], content_index=0, part=part)]
        opened["content"].append(part)
        return added

    def text_delta(text: str) -> str:
        assert opened is not None
        opened["content"][0]["text"] += text
        return event("response.output_text.delta", output_index=len(output) - 1,
                     item_id=opened["id"], content_index=0, delta=text, logprobs=[])

    def close(status: str) -> list[str]:
        nonlocal opened
        item, opened = opened, None
        if item is None:
            return []
        index = output.index(item)
        done: list[str] = []
        if item["type"] == "message":
            part = item["content"][0]
            done += [event("response.output_text.done", output_index=index,
                           item_id=item["id"], content_index=0, text=part["text"],
                           logprobs=[]),
                     event("response.content_part.done", output_index=index,
                           item_id=item["id"], content_index=0, part=part)]
        else:
            done.append(event("response.function_call_arguments.done", output_index=index,
                              item_id=item["id"], arguments=item["arguments"]))
        item["status"] = status
        return done + [event("response.output_item.done", output_index=index, item=item)]

    yield event("response.created", response=body("in_progress"))
    yield event("response.in_progress", response=body("in_progress"))
    parser = run.use.stream_parser()
    sent, last = 0, None
    try:
        async for _, out in serving.merge_streams(run.streams):
            last = out
            o = out.outputs[0]
            new, sent = o.text[sent:], len(o.text)
            if parser is None:
                text, calls = new, []
            else:
                d = parser.feed(new, o.finished)
                text, calls = d.content, d.tool_calls
            if text:
                if opened is None or opened["type"] != "message":
                    pending += text
                    if parser is not None and not pending.strip():
                        text = ""
                    else:
                        for e in close("completed") + open_message():
                            yield e
                        text, pending = pending, ""
                if text:
                    yield text_delta(text)
            for piece in calls:
                if "id" in piece:  # a new call: its own item
                    for e in close("completed"):
                        yield e
                    opened = {"type": "function_call", "id": _new_id("fc"),
                              "call_id": piece["id"], "name": piece["function"]["name"],
                              "arguments": "", "status": "in_progress"}
                    output.append(opened)
                    yield event("response.output_item.added", output_index=len(output) - 1,
                                item=opened)
                args = piece["function"]["arguments"]
                if args and opened is not None:
                    opened["arguments"] += args
                    yield event("response.function_call_arguments.delta",
                                output_index=len(output) - 1, item_id=opened["id"], delta=args)
    except Exception as e:  # noqa: BLE001 - reported in the stream, which then ends
        if isinstance(e, (RequestFailedError, APIError)):
            code = "engine_error" if isinstance(e, RequestFailedError) else e.code
            message = str(e)
        else:
            logger.exception("streaming a response failed", exc_info=e)
            code, message = "internal_error", f"internal error: {type(e).__name__}: {e}"
        yield event("error", code=code, message=message, param=None)
        return
    o = last.outputs[0] if last is not None else None
    status, details = _status(o)
    if not output:  # a text answer always has its message
        for e in open_message():
            yield e
        if pending:
            yield text_delta(pending)
    for e in close("incomplete" if status == "incomplete" else "completed"):
        yield e
    final = body(status, details, _usage(last))
    keep(final)
    yield event("response.completed" if status == "completed" else "response.incomplete",
                response=final)


# --- stored responses ---------------------------------------------------------------------------
def get_response(store: ResponseStore, response_id: str) -> JSONResponse:
    """GET /v1/responses/{response_id}."""
    return JSONResponse(store.get(response_id, "response_id").body)


def delete_response(store: ResponseStore, response_id: str) -> JSONResponse:
    """DELETE /v1/responses/{response_id}."""
    store.delete(response_id)
    return JSONResponse(ResponseDeleted(id=response_id).model_dump())


def list_input_items(store: ResponseStore, response_id: str, order: str) -> JSONResponse:
    """GET /v1/responses/{response_id}/input_items: the response's own input items."""
    items = list(store.get(response_id, "response_id").input)
    if order == "desc":
        items.reverse()
    return JSONResponse(InputItemList(data=items, first_id=items[0]["id"] if items else None,
                                      last_id=items[-1]["id"] if items else None
                                      ).model_dump())

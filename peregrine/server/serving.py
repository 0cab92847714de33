"""Completions and chat completions on the async engine: a request in, JSON or SSE out.

Each handler validates and tokenizes on the event loop's side (tokenizing and chat
templates run in a worker thread), submits one request per prompt (through the request
coalescer, which lets identical deterministic ones share an engine request), then either
collects the final outputs or streams deltas as server-sent events. A client that goes
away aborts its engine requests, so their KV blocks are freed at once."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from peregrine.engine.async_engine import (AsyncLLMEngine, EngineNotReadyError,
                                           RequestFailedError, RequestStream)
from peregrine.lora.request import LoRARequest
from peregrine.models.errors import PromptTooLongError
from peregrine.models.tokenizer import Tokenizer
from peregrine.outputs import CompletionOutput, Logprob, RequestOutput
from peregrine.sampling_params import SamplingParams
from peregrine.server.args import ServerArgs
from peregrine.server.context_budget import (ChatFit, Document, Render, Truncation, fit_chat,
                                             prompt_cut, template_knows_documents)
from peregrine.server.coalescing import RequestCoalescer
from peregrine.server.errors import APIError, bad_request
from peregrine.server import tools as tool_calls
from peregrine.server.metrics import ServerMetrics
from peregrine.server.semantic_cache import Probe, SemanticCache, probe_chat, probe_completion
from peregrine.server.tools import template_knows_tools
from peregrine.structured.grammar import InvalidConstraintError
from peregrine.server.protocol import (ChatCompletionRequest, ChatCompletionResponse, ChatChoice,
                                       ChatDocument, ChatLogprobs, ChatMessage, ChatResponseMessage, ChatTool,
                                       CompletionChoice, CompletionLogprobs, CompletionRequest,
                                       CompletionResponse, FunctionCall, NamedToolChoice,
                                       PromptTruncation, SamplingRequest, TokenLogprob,
                                       ToolCall, TopLogprob, UsageEnergy,
                                       UsageInfo)
from peregrine.structured.grammar import StructuredOutputs

T = TypeVar("T")
logger = logging.getLogger("peregrine.server")

# JSON has no -inf; OpenAI-compatible servers send a very negative number instead.
_MIN_LOGPROB = -9999.0
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Prompt:
    """One prompt, tokenized; `text` is what echo prints (None: decode the ids);
    `truncation`: what was left out to fit it."""

    text: str | None
    token_ids: list[int]
    truncation: Truncation | None = None


@dataclass
class ServingContext:
    """What the generation routes share: the engine, the metrics and the server's limits."""

    engine: AsyncLLMEngine
    metrics: ServerMetrics
    model_names: list[str]  # the first is the served name; the others are accepted aliases
    args: ServerArgs
    # Every add and abort goes through it, so a coalesced client's abort only detaches it.
    requests: RequestCoalescer = field(init=False)

    def __post_init__(self) -> None:
        self.use_engine(self.engine)
    cache: SemanticCache | None = None  # --semantic-cache
    lora_request: LoRARequest | None = None  # an adapter served as a model: its requests'

    def use_engine(self, engine: AsyncLLMEngine) -> None:
        """Serve with `engine` from now on (a model loaded again runs on a new engine)."""
        self.engine = engine
        self.requests = RequestCoalescer(engine, self.metrics,
                                         enabled=self.args.request_coalescing,
                                         lora_request=self.lora_request)

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def check_model(self, name: str | None) -> None:
        """404 unless `name` is empty or names the served model."""
        if name and name not in self.model_names:
            raise APIError(HTTPStatus.NOT_FOUND, f"The model `{name}` does not exist; this "
                           f"server serves `{self.model_name}`.", param="model",
                           code="model_not_found")

    def ready(self) -> AsyncLLMEngine:
        """The engine with its model loaded; else a 503 (loading, failed, or stopped)."""
        if not self.engine.is_ready:
            if self.engine.load_error is not None:
                message = f"the model failed to load: {self.engine.load_error}"
            elif self.engine.loaded.is_set():
                message = "the server is shutting down"
            else:
                message = "the model is still loading; retry in a few seconds"
            raise APIError(HTTPStatus.SERVICE_UNAVAILABLE, message, code="model_not_ready",
                           headers={"Retry-After": "2"})
        return self.engine

    def check_queue(self, count: int = 1) -> None:
        """429 with Retry-After when `count` more requests would pass --max-queue-len waiting
        ones (400 when they could never fit)."""
        limit = self.args.max_queue_len
        if count > limit:
            raise bad_request(f"prompt holds {count} prompts; at most {limit} "
                              "(--max-queue-len) fit in one request", "prompt")
        waiting = self.engine.num_waiting
        if waiting + count > limit:
            self.metrics.reject("queue_full")
            raise APIError(HTTPStatus.TOO_MANY_REQUESTS, f"the server is busy: {waiting} "
                           f"requests are waiting (--max-queue-len {limit}); retry later",
                           code="queue_full", headers={"Retry-After": "1"})

    def check_limits(self, req: SamplingRequest) -> None:
        """400 for a request past the server's limits: sequences per prompt (n, best_of,
        beam_width) and stop strings."""
        # A prompt's sequences run together, so they must fit the engine's batch at once.
        cap = min(self.args.max_n, self.engine.config.max_num_seqs)
        asked = {"n": req.n, "best_of": req.best_of or 0,
                 "beam_width": (req.beam_width or 0) if req.use_beam_search else 0}
        for name, value in asked.items():
            if value > cap:
                raise bad_request(f"{name} must be <= {cap} (--max-n {self.args.max_n}, "
                                  f"--max-num-seqs {self.engine.config.max_num_seqs}), got "
                                  f"{value}", name)
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stops) > self.args.max_stop_sequences:
            raise bad_request(f"stop may hold at most {self.args.max_stop_sequences} strings "
                              f"(--max-stop-sequences), got {len(stops)}", "stop")

    def prompt_limit(self) -> int:
        """Most tokens one prompt may have: --max-prompt-tokens, within the context."""
        limit = self.ready().context_limit
        return min(limit, self.args.max_prompt_tokens or limit)


# --- shared steps -------------------------------------------------------------------------------
def _max_tokens(ctx: ServingContext, requested: int | None, default: int | None,
                prompt_len: int, param: str) -> int:
    """The request's max_tokens; unset means `default` (at most the room the context
    leaves), or all that room when `default` is None."""
    if requested is not None:
        return requested
    room = ctx.ready().context_limit - prompt_len
    if room < 1:
        raise bad_request(f"the prompt ({prompt_len} tokens) leaves no room to generate: the "
                          f"limit is {ctx.ready().context_limit} tokens", param)
    return room if default is None else min(default, room)


def _too_long(e: PromptTooLongError, ctx: ServingContext, param: str) -> APIError:
    flag = " (--max-prompt-tokens)" if e.limit < ctx.ready().context_limit else ""
    return bad_request(f"{param}: the prompt has {'' if e.exact else 'at least '}{e.count} "
                       f"tokens; at most {e.limit}{flag} fit", param)


def _params(req: SamplingRequest, max_tokens: int, logprobs: int | None) -> SamplingParams:
    if req.stream and (req.use_beam_search or (req.best_of or req.n) > req.n):
        # The answer is only known at the end: the beams (or best samples) change until then.
        raise bad_request("stream is not supported with use_beam_search or best_of > n",
                          "stream")
    try:
        return req.sampling_params(max_tokens, logprobs)
    except ValueError as e:
        raise bad_request(e) from None


async def _submit(ctx: ServingContext, base_id: str, prompts: list[Prompt],
                  params: list[SamplingParams], priority: int,
                  constraint_field: str | None = None) -> list[RequestStream]:
    """Add one engine request per prompt; on any refusal abort the ones already added.
    `constraint_field`: the request field a structured-output constraint came in (the
    `param` of the 400 when it does not compile)."""
    streams: list[RequestStream] = []
    try:
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            request_id = base_id if len(prompts) == 1 else f"{base_id}-{i}"
            streams.append(await ctx.requests.add_request(
                request_id, {"prompt": prompt.text, "prompt_token_ids": prompt.token_ids}, p,
                priority))
    except BaseException as e:
        for s in streams:
            ctx.requests.abort(s.request_id)
        if isinstance(e, InvalidConstraintError):
            raise bad_request(e, constraint_field) from None
        if isinstance(e, ValueError):
            raise bad_request(e) from None
        if isinstance(e, EngineNotReadyError):
            raise APIError(HTTPStatus.SERVICE_UNAVAILABLE, str(e), code="model_not_ready",
                           headers={"Retry-After": "2"}) from None
        raise
    return streams


async def _wait_for_disconnect(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, T],
                               on_disconnect: Callable[[], None]) -> T:
    """Run `work`; if the client disconnects first, call on_disconnect and cancel it."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        on_disconnect()
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        on_disconnect()
        task.cancel()
        raise APIError(499, "the client closed the request", code="client_closed_request")
    return task.result()


async def _final_outputs(streams: list[RequestStream]) -> list[RequestOutput]:
    finals = []
    for stream in streams:
        last = None
        async for out in stream:
            last = out
        assert last is not None
        finals.append(last)
    return finals


async def collect(ctx: ServingContext, request: Request,
                   streams: list[RequestStream]) -> list[RequestOutput]:
    """Wait for every stream's final output; abort them all if the client goes away."""
    def abort() -> None:
        for s in streams:
            ctx.requests.abort(s.request_id)
    try:
        return await _unless_disconnected(request, _final_outputs(streams), abort)
    except RequestFailedError as e:
        abort()
        raise APIError(HTTPStatus.INTERNAL_SERVER_ERROR, str(e), code="engine_error") from None


async def merge_streams(streams: list[AsyncIterator[RequestOutput]]
                        ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as e:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


class EngineStreamingResponse(StreamingResponse):
    """An SSE response that aborts its engine requests however the stream ends."""

    def __init__(self, content: AsyncIterator[str], ctx: ServingContext,
                 streams: list[RequestStream], headers: dict[str, str] | None = None) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={**_SSE_HEADERS, **(headers or {})})
        self._ctx = ctx
        self._streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Finished requests are no longer known to the engine; aborting them is a no-op.
            for s in self._streams:
                if not s.finished:
                    self._ctx.requests.abort(s.request_id)


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _sse_error(e: Exception) -> str:
    """The error event that ends a stream (OpenAI clients raise it as an APIError)."""
    if isinstance(e, RequestFailedError):
        message, code = str(e), "engine_error"
    else:
        logger.exception("streaming a response failed", exc_info=e)
        message, code = f"internal error: {type(e).__name__}: {e}", "internal_error"
    return _sse({"error": {"message": message, "type": "server_error", "param": None,
                           "code": code}})


_DONE = "data: [DONE]\n\n"


def _usage(outs: list[RequestOutput], prompts: list[Prompt] | None = None,
           energy: bool = False) -> UsageInfo:
    """Token counts of the outputs; `truncation` sums what fitting `prompts` left out;
    with `energy`, the joules (and dollars, when priced) the engine charged them."""
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outs)
    cuts = [p.truncation for p in prompts or [] if p.truncation]
    truncation = None
    if cuts:
        truncation = PromptTruncation(**{name: sum(getattr(c, name) for c in cuts)
                                         for name in PromptTruncation.model_fields})
    usage = UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                      total_tokens=prompt + completion,
                      prompt_tokens_details={"cached_tokens": cached}, truncation=truncation)
    metrics = [o.metrics for o in outs if o.metrics is not None]
    if energy and metrics and all(m.energy_joules is not None for m in metrics):
        usage.energy = UsageEnergy(joules=sum(m.energy_joules for m in metrics),
                                   source=metrics[0].energy_source or "model")
        if all(m.cost_usd is not None for m in metrics):
            usage.cost_usd = sum(m.cost_usd for m in metrics)
    return usage


def _wants_energy(ctx: ServingContext, req: SamplingRequest) -> bool:
    """Whether a response's usage carries energy and cost (asked, or --usage-energy)."""
    return ctx.args.usage_energy or req.usage_detail


# --- logprobs -----------------------------------------------------------------------------------
def _token_str(tok: Tokenizer, token_id: int, lp: Logprob | None) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return tok.token_text(token_id)


def _top(entries: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    return sorted(entries.items(), key=lambda e: -e[1].logprob)[:k]


def _finite(x: float) -> float:
    return max(x, _MIN_LOGPROB)


def completion_logprobs(tok: Tokenizer, token_ids: list[int],
                        logprobs: list[dict[int, Logprob] | None], num_top: int,
                        text_offset: int) -> CompletionLogprobs:
    """The completions API's logprobs of `token_ids`: the chosen token's, plus the top
    `num_top` (the chosen one always included, as vLLM does)."""
    res = CompletionLogprobs()
    offset = text_offset
    for tid, entries in zip(token_ids, logprobs):
        chosen = entries.get(tid) if entries else None
        s = _token_str(tok, tid, chosen)
        res.tokens.append(s)
        res.text_offset.append(offset)
        offset += len(s)
        res.token_logprobs.append(None if chosen is None else _finite(chosen.logprob))
        if entries is None:
            res.top_logprobs.append(None)
            continue
        top = dict(_top(entries, num_top))
        if chosen is not None:
            top.setdefault(tid, chosen)
        res.top_logprobs.append({_token_str(tok, t, lp): _finite(lp.logprob)
                                 for t, lp in top.items()})
    return res


def chat_logprobs(tok: Tokenizer, token_ids: list[int],
                  logprobs: list[dict[int, Logprob] | None], num_top: int) -> ChatLogprobs:
    """The chat API's logprobs of `token_ids`, with `num_top` alternatives each."""
    content = []
    for tid, entries in zip(token_ids, logprobs):
        entries = entries or {}
        chosen = entries.get(tid)
        s = _token_str(tok, tid, chosen)
        content.append(TokenLogprob(
            token=s, logprob=_finite(chosen.logprob) if chosen else _MIN_LOGPROB,
            bytes=list(s.encode("utf-8")),
            top_logprobs=[TopLogprob(token=(ts := _token_str(tok, t, lp)),
                                     logprob=_finite(lp.logprob), bytes=list(ts.encode("utf-8")))
                          for t, lp in _top(entries, num_top)]))
    return ChatLogprobs(content=content)


@dataclass
class _ChoiceState:
    """What a stream already sent of one choice."""

    text: int = 0
    tokens: int = 0
    text_offset: int = 0
    done: bool = False


def _new_text(o: CompletionOutput, state: _ChoiceState) -> tuple[str, list[int], list[Any] | None]:
    """The text, token ids and logprobs of `o` not yet sent (and mark them sent)."""
    text = o.text[state.text:] if len(o.text) > state.text else ""
    end = len(o.token_ids)
    ids = o.token_ids[state.tokens:end]
    lps = o.logprobs[state.tokens:end] if o.logprobs is not None else None
    state.text = max(state.text, len(o.text))
    state.tokens = end
    return text, ids, lps


# --- /v1/completions ----------------------------------------------------------------------------
def _prompt_count(req: CompletionRequest) -> int:
    """How many prompts (engine requests per candidate) `prompt` holds."""
    p = req.prompt
    return 1 if isinstance(p, str) or (p and isinstance(p[0], int)) else len(p)


def _cut_prompts(prompts: list[Prompt], keep: int | None) -> list[Prompt]:
    """Each prompt cut to its last `keep` tokens (truncate_prompt_tokens)."""
    if keep is None:
        return prompts
    return [p if len(p.token_ids) <= keep else
            Prompt(None, p.token_ids[-keep:],
                   Truncation(dropped_tokens=len(p.token_ids) - keep)) for p in prompts]


def _prompt_cut(ctx: ServingContext, truncate_prompt_tokens: int | None) -> int | None:
    """The tokens truncate_prompt_tokens keeps (None: all); 400 for a bad value."""
    try:
        return prompt_cut(truncate_prompt_tokens, ctx.prompt_limit())
    except ValueError as e:
        raise bad_request(e, "truncate_prompt_tokens") from None


async def _completion_prompts(ctx: ServingContext, req: CompletionRequest) -> list[Prompt]:
    p = req.prompt
    keep = _prompt_cut(ctx, req.truncate_prompt_tokens)
    # A prompt to be cut is read whole (within --max-request-bytes), so it may be long.
    limit = ctx.prompt_limit() if keep is None else None
    if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], str)):
        texts = [p] if isinstance(p, str) else list(p)
        try:
            ids = await ctx.ready().tokenize(texts, req.add_special_tokens, limit)
        except PromptTooLongError as e:
            raise _too_long(e, ctx, "prompt") from None
        return _cut_prompts([Prompt(t, i) for t, i in zip(texts, ids)], keep)
    prompts = None
    if isinstance(p, list) and p and isinstance(p[0], int):
        prompts = [Prompt(None, list(p))]  # type: ignore[arg-type]
    elif isinstance(p, list) and p and all(isinstance(x, list) and x for x in p):
        prompts = [Prompt(None, list(x)) for x in p]  # type: ignore[arg-type]
    if prompts is None:
        raise bad_request("prompt must be a non-empty string, list of strings, list of token "
                          "ids or list of token-id lists", "prompt")
    prompts = _cut_prompts(prompts, keep)
    for prompt in prompts:
        if len(prompt.token_ids) > ctx.prompt_limit():
            raise _too_long(PromptTooLongError(len(prompt.token_ids), ctx.prompt_limit()), ctx,
                            "prompt")
    return prompts


async def create_completion(ctx: ServingContext, req: CompletionRequest,
                            request: Request) -> Response:
    """POST /v1/completions."""
    ctx.check_model(req.model)
    ctx.ready()
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    ctx.check_limits(req)
    ctx.check_queue(_prompt_count(req))
    prompts = await _completion_prompts(ctx, req)
    params = []
    for prompt in prompts:
        max_tokens = _max_tokens(ctx, req.max_tokens, None if "max_tokens" in
                                 req.model_fields_set else 16, len(prompt.token_ids),
                                 "max_tokens")
        p = _params(req, max_tokens, req.logprobs)
        if req.echo and req.logprobs is not None:
            p = dataclasses.replace(p, prompt_logprobs=req.logprobs)
        params.append(p)
    base_id = f"cmpl-{uuid.uuid4().hex}"
    probe = await probe_completion(ctx.cache, ctx.model_name, request.headers, req, params)
    if probe.hit:
        outs = [probe.output(base_id, prompts[0].text, prompts[0].token_ids)]
        if req.stream:
            return StreamingResponse(
                _stream_completion(ctx, req, base_id, prompts, [probe.replay(outs[0])],
                                   probe.usage), media_type="text/event-stream",
                headers={**_SSE_HEADERS, **probe.headers})
    else:
        streams = await _submit(ctx, base_id, prompts, params, req.priority,
                                req.constraint()[1])
        if req.stream:
            return EngineStreamingResponse(
                _stream_completion(ctx, req, base_id, prompts, [probe.tap(s) for s in streams]),
                ctx, streams, probe.headers)
        outs = await collect(ctx, request, streams)
        await probe.store(outs[0])
    tok = ctx.ready().tokenizer
    choices = []
    for pi, (prompt, out) in enumerate(zip(prompts, outs)):
        prefix = _echo_text(tok, prompt) if req.echo else ""
        for o in out.outputs:
            lp = None
            if req.logprobs is not None and o.logprobs is not None:
                lp = completion_logprobs(tok, o.token_ids, o.logprobs, req.logprobs, len(prefix))
                if req.echo:
                    lp = _with_prompt_logprobs(tok, out, req.logprobs, lp)
            choices.append(CompletionChoice(index=pi * req.n + o.index, text=prefix + o.text,
                                            logprobs=lp, finish_reason=o.finish_reason,
                                            stop_reason=o.stop_reason))
    body = CompletionResponse(id=base_id, model=ctx.model_name, choices=choices,
                              usage=_usage(outs, prompts, _wants_energy(ctx, req)))
    data = body.model_dump()
    data["usage"].update(probe.usage)
    return JSONResponse(data, headers=probe.headers)


def _echo_text(tok: Tokenizer, prompt: Prompt) -> str:
    return prompt.text if prompt.text is not None else tok.decode(prompt.token_ids)


def _with_prompt_logprobs(tok: Tokenizer, out: RequestOutput, num_top: int,
                          generated: CompletionLogprobs) -> CompletionLogprobs:
    """Prepend the prompt's logprobs (echo); the first prompt token has none."""
    if out.prompt_logprobs is None:
        return generated
    prompt = completion_logprobs(tok, out.prompt_token_ids, out.prompt_logprobs, num_top, 0)
    return CompletionLogprobs(
        text_offset=prompt.text_offset + generated.text_offset,
        token_logprobs=prompt.token_logprobs + generated.token_logprobs,
        tokens=prompt.tokens + generated.tokens,
        top_logprobs=prompt.top_logprobs + generated.top_logprobs)


def _stream_completion(ctx: ServingContext, req: CompletionRequest, base_id: str,
                       prompts: list[Prompt], streams: list[AsyncIterator[RequestOutput]],
                       usage_extra: dict[str, Any] | None = None) -> AsyncIterator[str]:
    tok = ctx.ready().tokenizer
    states = {pi * req.n + i: _ChoiceState() for pi in range(len(prompts)) for i in range(req.n)}
    lead = []
    if req.echo:
        for pi, prompt in enumerate(prompts):
            text = _echo_text(tok, prompt)
            for i in range(req.n):
                states[pi * req.n + i].text_offset = len(text)
            lead.append([{"index": pi * req.n + i, "text": text, "logprobs": None,
                          "finish_reason": None} for i in range(req.n)])

    def choice(index: int, o: CompletionOutput, state: _ChoiceState, text: str,
               ids: list[int], lps: list[Any] | None) -> dict[str, Any]:
        lp = None
        if req.logprobs is not None and lps is not None and ids:
            lp = completion_logprobs(tok, ids, lps, req.logprobs, state.text_offset).model_dump()
            state.text_offset += sum(len(t) for t in lp["tokens"])
        return {"index": index, "text": text, "logprobs": lp}

    return _sse_stream(ctx, req, base_id, "text_completion", merge_streams(streams), states,
                       lead, req.logprobs is not None, choice, prompts, usage_extra)


async def _sse_stream(ctx: ServingContext, req: SamplingRequest, base_id: str, kind: str,
                      outputs: AsyncIterator[tuple[int, RequestOutput]],
                      states: dict[int, _ChoiceState], lead: list[list[dict[str, Any]]],
                      wants_logprobs: bool, choice: Callable[..., dict[str, Any] | None],
                      prompts: list[Prompt], usage_extra: dict[str, Any] | None = None
                      ) -> AsyncIterator[str]:
    """A streamed response: the `lead` chunks, a chunk per choice with news (`choice` builds
    its fields), the usage (plus `usage_extra`), then [DONE]; an error ends it with an error
    event."""
    created = int(time.time())
    latest: dict[int, RequestOutput] = {}

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        data = {"id": base_id, "object": kind, "created": created, "model": ctx.model_name,
                "choices": choices}
        if req.continuous_usage and latest:
            data["usage"] = {**_usage(list(latest.values()), prompts,
                                      _wants_energy(ctx, req)).model_dump(),
                             **(usage_extra or {})}
        return data

    for choices in lead:
        yield _sse(chunk(choices))
    try:
        async for pi, out in outputs:
            latest[pi] = out
            for o in out.outputs:
                index = pi * req.n + o.index
                state = states[index]
                if state.done:
                    continue
                text, ids, lps = _new_text(o, state)
                if not text and not o.finished and not (wants_logprobs and ids):
                    continue
                fields = choice(index, o, state, text, ids, lps)
                state.done = o.finished
                if fields is None:  # the choice holds this text back for now
                    continue
                yield _sse(chunk([{"finish_reason": o.finish_reason,
                                   "stop_reason": o.stop_reason, **fields}]))
    except Exception as e:  # noqa: BLE001 - reported in the stream, which then ends
        yield _sse_error(e) + _DONE
        return
    if req.include_usage and latest:
        yield _sse({"id": base_id, "object": kind, "created": created,
                    "model": ctx.model_name, "choices": [],
                    "usage": {**_usage(list(latest.values()), prompts,
                                       _wants_energy(ctx, req)).model_dump(),
                              **(usage_extra or {})}})
    yield _DONE


# --- /v1/chat/completions -----------------------------------------------------------------------
def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages as the template expects them: string content, `developer` as system."""
    if not messages:
        raise bad_request("messages must not be empty", "messages")
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise bad_request(f"messages[{i}].content: only text parts are supported, "
                                      f"got a {part.type!r} part", f"messages.{i}.content")
                texts.append(part.text)
            content = "\n".join(texts)
        if content is None and m.role != "assistant":  # an assistant may only call tools
            raise bad_request(f"messages[{i}].content is required for role {m.role!r}",
                              f"messages.{i}.content")
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                               "content": content or ""}
        if m.name:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


# What the renderer passes the chat template itself; a request cannot override them.
_TEMPLATE_OWN_ARGS = {"messages", "add_generation_prompt", "bos_token", "eos_token", "limit",
                      "tools"}


@dataclass
class ChatBudget:
    """How a chat request fits the context: the tokens kept for the answer, whether old
    turns may go, its documents, and vLLM's truncate_prompt_tokens."""

    reserve: int
    drop_history: bool = False
    documents: list[ChatDocument] | None = None
    documents_max_tokens: int | None = None
    truncate_prompt_tokens: int | None = None

    @property
    def fits(self) -> bool:
        """Whether anything beyond rendering and the limit check is asked for."""
        return self.drop_history or bool(self.documents)


async def render_chat(ctx: ServingContext, messages: list[ChatMessage],
                      add_generation_prompt: bool,
                      template_kwargs: dict[str, Any] | None = None,
                      capped: bool = True, tools: list[ChatTool] | None = None,
                      budget: ChatBudget | None = None) -> Prompt:
    """The chat template applied and tokenized (off the event loop), within the limits on
    messages and (when `capped`) prompt tokens; `tools` go in as the template wants them;
    `budget` fits documents and history to the room max_tokens leaves."""
    if len(messages) > ctx.args.max_messages:
        raise bad_request(f"messages holds {len(messages)} messages; at most "
                          f"{ctx.args.max_messages} (--max-messages)", "messages")
    engine = ctx.ready()
    knows_tools = template_knows_tools(engine.tokenizer.chat_template)
    kwargs = dict(template_kwargs or {})
    taken = sorted(set(kwargs) & _TEMPLATE_OWN_ARGS)
    if taken:
        raise bad_request(f"chat_template_kwargs must not set {', '.join(taken)} (the server "
                          "sets them)", "chat_template_kwargs")
    if tools and knows_tools:
        kwargs["tools"] = [t.model_dump(exclude_none=True) for t in tools]

    async def render(msgs: list[dict[str, Any]], limit: int | None,
                     extra: dict[str, Any]) -> tuple[str, list[int]]:
        return await engine.render_chat(tool_calls.prepare_messages(msgs, tools, knows_tools),
                                        add_generation_prompt, limit, **kwargs, **extra)

    msgs = chat_messages(messages)
    limit = ctx.prompt_limit() if capped else None
    try:
        if budget is None or (not budget.fits and budget.truncate_prompt_tokens is None):
            return Prompt(*await render(msgs, limit, {}))
        return await _fit_chat(ctx, msgs, budget, render)
    except PromptTooLongError as e:
        if budget is not None and budget.fits and e.limit < ctx.prompt_limit():
            raise bad_request(f"messages: the kept messages (the system prompt and the last "
                              f"user turn on) have {'' if e.exact else 'at least '}{e.count} "
                              f"tokens; at most {e.limit} fit and leave {budget.reserve} for "
                              "max_tokens", "messages") from None
        raise _too_long(e, ctx, "messages") from None
    except ValueError as e:
        raise bad_request(e, "messages") from None
    except Exception as e:  # jinja2 errors: the template cannot render these messages
        if type(e).__module__.startswith("jinja2"):
            raise bad_request(f"the chat template failed on these messages: {e}",
                              "messages") from None
        raise


async def _fit_chat(ctx: ServingContext, msgs: list[dict[str, Any]], budget: ChatBudget,
                    render: Render) -> Prompt:
    """A chat rendered within its budget: documents and history fitted, then cut to
    truncate_prompt_tokens."""
    tok = ctx.ready().tokenizer
    keep = _prompt_cut(ctx, budget.truncate_prompt_tokens)
    if budget.fits:
        limit = min(ctx.prompt_limit(), ctx.ready().context_limit - budget.reserve)
        if keep is not None:
            limit = max(limit, keep)  # the cut below fits what the budget did not
        docs = [Document(d.text, d.title, d.score) for d in budget.documents or []]
        fit = ChatFit(limit, budget.drop_history, docs or None, budget.documents_max_tokens,
                      template_knows_documents(tok.chat_template))
        text, ids, report = await fit_chat(
            msgs, fit, render, lambda t: len(tok.encode(t, False)),
            lambda t, n: tok.decode(tok.encode(t, False)[:n]))
    else:
        (text, ids), report = await render(msgs, None, {}), Truncation()
    if keep is not None and len(ids) > keep:
        report.dropped_tokens += len(ids) - keep
        text, ids = None, ids[-keep:]
    return Prompt(text, ids, report or None)


@dataclass
class ToolUse:
    """How a chat request uses tools: the ones shown to the model, the choice, the parser."""

    tools: list[ChatTool] | None  # None: the model sees no tools (none given, or "none")
    choice: str | NamedToolChoice
    parser: str

    @property
    def forced(self) -> str | NamedToolChoice | None:
        """The choice when it forces a call (required or named), else None."""
        return self.choice if self.tools and self.choice != "auto" else None

    @property
    def names(self) -> set[str]:
        return {t.function.name for t in self.tools or []}

    def stream_parser(self) -> tool_calls.StreamParser | None:
        if not self.tools:
            return None
        return tool_calls.StreamParser(self.parser, self.names, self.forced)

    def message(self, text: str) -> tuple[ChatResponseMessage, bool]:
        """The assistant message of a whole output, and whether it calls tools."""
        if not self.tools:
            return ChatResponseMessage(content=text), False
        content: str | None = None
        try:
            if self.forced is not None:
                calls = tool_calls.forced_calls(text, self.forced)
            else:
                content, calls = tool_calls.parse_calls(text, self.parser, self.names)
        except (ValueError, KeyError, TypeError):  # a forced output cut short by max_tokens
            content, calls = text, []
        return ChatResponseMessage(content=content, tool_calls=[
            ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
            for c in calls] or None), bool(calls)


def _tool_use(ctx: ServingContext, req: ChatCompletionRequest) -> ToolUse:
    """Check the request's tools against its tool_choice and constraints (400s)."""
    choice = req.tool_choice or ("auto" if req.tools else "none")
    try:
        parser = tool_calls.choose_parser(ctx.ready().tokenizer.chat_template,
                                          ctx.args.tool_call_parser)
    except ValueError as e:
        raise bad_request(e, "tool_call_parser") from None
    if choice != "none" and not req.tools:
        raise bad_request("tool_choice needs tools", "tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in {
            t.function.name for t in req.tools or []}:
        raise bad_request(f"tool_choice names {choice.function.name!r}, which is not in "
                          "tools", "tool_choice")
    names = [t.function.name for t in req.tools or []]
    if len(set(names)) != len(names):
        raise bad_request("tools must have distinct function names", "tools")
    use = ToolUse(req.tools if choice != "none" else None, choice, parser)
    if use.forced is not None and req.constraint()[0] is not None:
        what = choice if isinstance(choice, str) else "naming a function"
        raise bad_request(f"tool_choice {what} cannot be combined with "
                          f"{req.constraint()[1]}", "tool_choice")
    return use


@dataclass
class ChatPlan:
    """A chat request validated and rendered, ready to submit."""

    base_id: str
    prompt: Prompt
    use: ToolUse
    num_top: int | None
    params: SamplingParams
    constraint_field: str | None


@dataclass
class ChatRun:
    """A chat request accepted by the engine: its stream, its prompt and how it uses tools."""

    base_id: str
    prompt: Prompt
    use: ToolUse
    num_top: int | None
    streams: list[RequestStream]


async def _chat_prompt(ctx: ServingContext, req: ChatCompletionRequest, use: ToolUse,
                       requested: int | None) -> Prompt:
    """The request's messages rendered within its budget, leaving room for `requested`."""
    budget = ChatBudget(reserve=requested or ctx.args.max_tokens_default or 1,
                        drop_history=(req.truncation or ctx.args.chat_truncation) == "auto",
                        documents=req.documents, documents_max_tokens=req.documents_max_tokens,
                        truncate_prompt_tokens=req.truncate_prompt_tokens)
    prompt = await render_chat(ctx, req.messages, req.add_generation_prompt,
                               req.chat_template_kwargs, tools=use.tools, budget=budget)
    context, length = ctx.ready().context_limit, len(prompt.token_ids)
    if requested is not None and length + requested > context:
        field = "max_completion_tokens" if req.max_completion_tokens is not None \
            else "max_tokens"
        # max_tokens alone past the context is its own fault; else the messages could shrink
        raise bad_request(f"this model's context is {context} tokens, but {length + requested} "
                          f"were asked for ({length} in the messages, {requested} in the "
                          f"completion): shorten the messages or {field}, or set truncation: "
                          "auto to drop the oldest turns",
                          "messages" if requested < context else field)
    return prompt


async def start_chat(ctx: ServingContext, req: ChatCompletionRequest, base_id: str) -> ChatRun:
    """Validate, render and submit a chat request (shared by the chat and Messages APIs)."""
    return await submit_chat(ctx, req, await plan_chat(ctx, req, base_id))


async def submit_chat(ctx: ServingContext, req: ChatCompletionRequest,
                      plan: ChatPlan) -> ChatRun:
    """Hand a planned chat request to the engine."""
    streams = await _submit(ctx, plan.base_id, [plan.prompt], [plan.params], req.priority,
                            plan.constraint_field)
    return ChatRun(plan.base_id, plan.prompt, plan.use, plan.num_top, streams)


async def plan_chat(ctx: ServingContext, req: ChatCompletionRequest, base_id: str) -> ChatPlan:
    """Validate and render a chat request, and work out its sampling parameters."""
    ctx.check_model(req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    ctx.check_limits(req)
    use = _tool_use(ctx, req)
    ctx.check_queue()
    requested = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    prompt = await _chat_prompt(ctx, req, use, requested)
    max_tokens = _max_tokens(ctx, requested, ctx.args.max_tokens_default or None,
                             len(prompt.token_ids),
                             "max_completion_tokens" if req.max_completion_tokens is not None
                             else "max_tokens")
    num_top = (req.top_logprobs or 0) if req.logprobs else None
    params = _params(req, max_tokens, num_top)
    constraint_field = req.constraint()[1]
    if use.forced is not None:  # the grammar makes the call: arguments always validate
        schema = tool_calls.forced_schema(use.tools or [], use.forced, req.parallel_tool_calls)
        params = dataclasses.replace(params, structured=StructuredOutputs(
            json=schema, disable_any_whitespace=True))
        constraint_field = "tools"
    return ChatPlan(base_id, prompt, use, num_top, params, constraint_field)


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest,
                                 request: Request) -> Response:
    """POST /v1/chat/completions."""
    plan = await plan_chat(ctx, req, f"chatcmpl-{uuid.uuid4().hex}")
    probe = await probe_chat(ctx.cache, ctx.model_name, request.headers, req, plan.prompt.text,
                             plan.params)
    if probe.hit:  # the cached answer, through the same path as a generated one
        out = probe.output(plan.base_id, plan.prompt.text, plan.prompt.token_ids)
        if req.stream:
            return StreamingResponse(
                _stream_chat(ctx, req, plan, probe.replay(out), probe.usage),
                media_type="text/event-stream",
                headers={**_SSE_HEADERS, **probe.headers})
        return _chat_response(ctx, plan, out, probe, _wants_energy(ctx, req))
    run = await submit_chat(ctx, req, plan)
    if req.stream:
        return EngineStreamingResponse(
            _stream_chat(ctx, req, plan, probe.tap(run.streams[0])), ctx, run.streams,
            probe.headers)
    out = (await collect(ctx, request, run.streams))[0]
    await probe.store(out)
    return _chat_response(ctx, plan, out, probe, _wants_energy(ctx, req))


def _chat_response(ctx: ServingContext, plan: ChatPlan, out: RequestOutput,
                   probe: Probe, energy: bool = False) -> JSONResponse:
    """The JSON answer to a chat request from its final output (`energy`: usage says its
    joules and cost)."""
    base_id, use, num_top = plan.base_id, plan.use, plan.num_top
    tok = ctx.ready().tokenizer
    choices = []
    for o in out.outputs:
        lp = None
        if num_top is not None and o.logprobs is not None:
            lp = chat_logprobs(tok, o.token_ids, o.logprobs, num_top)
        message, called = use.message(o.text)
        finish = "tool_calls" if called and o.finish_reason == "stop" else o.finish_reason
        choices.append(ChatChoice(index=o.index, message=message, logprobs=lp,
                                  finish_reason=finish, stop_reason=o.stop_reason))
    body = ChatCompletionResponse(id=base_id, model=ctx.model_name, choices=choices,
                                  usage=_usage([out], [plan.prompt], energy))
    data = body.model_dump()
    for c in data["choices"]:  # OpenAI sends tool_calls only when there are some
        if c["message"]["tool_calls"] is None:
            del c["message"]["tool_calls"]
    data["usage"].update(probe.usage)
    return JSONResponse(data, headers=probe.headers)


def _stream_chat(ctx: ServingContext, req: ChatCompletionRequest, plan: ChatPlan,
                 stream: AsyncIterator[RequestOutput],
                 usage_extra: dict[str, Any] | None = None) -> AsyncIterator[str]:
    num_top, use = plan.num_top, plan.use
    tok = ctx.ready().tokenizer
    lead = [[{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
              "finish_reason": None} for i in range(req.n)]]
    parsers = {i: use.stream_parser() for i in range(req.n)}

    def choice(index: int, o: CompletionOutput, state: _ChoiceState, text: str,
               ids: list[int], lps: list[Any] | None) -> dict[str, Any] | None:
        lp = None
        if num_top is not None and lps is not None and ids:
            lp = chat_logprobs(tok, ids, lps, num_top).model_dump()
        parser = parsers[index]
        if parser is None:
            return {"index": index, "delta": {"content": text} if text or not o.finished
                    else {}, "logprobs": lp}
        # Tool markup never reaches the client as content: it becomes delta.tool_calls.
        d = parser.feed(text, o.finished)
        delta: dict[str, Any] = {}
        if d.content:
            delta["content"] = d.content
        if d.tool_calls:
            delta["tool_calls"] = d.tool_calls
        if not delta and not o.finished and lp is None:
            return None  # held back (may be the start of a call): nothing to send yet
        fields: dict[str, Any] = {"index": index, "delta": delta, "logprobs": lp}
        if o.finished and parser.called and o.finish_reason == "stop":
            fields["finish_reason"] = "tool_calls"
        return fields

    return _sse_stream(ctx, req, plan.base_id, "chat.completion.chunk",
                       merge_streams([stream]), {i: _ChoiceState() for i in range(req.n)},
                       lead, num_top is not None, choice, [plan.prompt], usage_extra)

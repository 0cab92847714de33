"""The HTTP server: OpenAI-compatible routes, auth, errors, metrics, the playground, and
`run_server` behind `peregrine serve`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from types import FrameType
from typing import Any, Literal, TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import peregrine
from peregrine.config import EngineConfig
from peregrine.engine.async_engine import AsyncLLMEngine
from peregrine.lora.request import LoRARequest
from peregrine.models.registry import resolve_model
from peregrine.server import messages, serving
from peregrine.server import responses as responses_api
from peregrine.server.anthropic_protocol import (AnthropicError, CountTokensRequest,
                                                 CountTokensResponse, MessagesRequest,
                                                 MessagesResponse)
from peregrine.server.args import ServerArgs
from peregrine.server.embeddings import EmbeddingService, create_embedding
from peregrine.server.errors import APIError, error_response
from peregrine.server.limits import BodySizeLimit, check_json
from peregrine.server.lora import (LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest,
                                   parse_lora_modules)
from peregrine.server.metrics import CONTENT_TYPE, ServerMetrics
from peregrine.server.model_entries import ModelEntry, estimate_memory
from peregrine.server.router import ModelRouter, ModelSlot, new_engine
from peregrine.server.openapi import (NO_BODY_ERRORS, STORED_ERRORS, install,
                                      json_body, responses)
from peregrine.server.responses_protocol import (InputItemList, ResponseDeleted,
                                                 ResponseObject, ResponsesRequest)
from peregrine.server.semantic_cache import SemanticCache
from peregrine.server.protocol import (ChatCompletionRequest, ChatCompletionResponse,
                                       CompletionRequest, CompletionResponse,
                                       DetokenizeRequest, DetokenizeResponse,
                                       EmbeddingRequest, EmbeddingResponse, ErrorResponse,
                                       ModelCard, ModelList, TokenizeRequest, TokenizeResponse,
                                       VersionResponse)

logger = logging.getLogger("peregrine.server")

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
M = TypeVar("M", bound=BaseModel)


# --- request bodies -----------------------------------------------------------------------------
def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


async def parse_body(request: Request, model: type[M]) -> M:
    """The JSON body as `model`; a 400 in OpenAI's shape for anything malformed (the body's
    size was checked by the BodySizeLimit middleware before any of it was read)."""
    body = await request.body()
    max_depth = request.app.state.peregrine.args.max_json_depth
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(HTTPStatus.BAD_REQUEST, f"the request body is not valid UTF-8 (bad byte "
                       f"at offset {e.start})", code="invalid_encoding") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise APIError(HTTPStatus.BAD_REQUEST, f"the request body is not valid JSON: {e.msg} "
                       f"(line {e.lineno}, column {e.colno})", code="invalid_json") from None
    except ValueError as e:
        raise APIError(HTTPStatus.BAD_REQUEST, f"the request body is not valid JSON: {e}",
                       code="invalid_json") from None
    except RecursionError:  # the parser recursed past Python's stack limit
        raise APIError(HTTPStatus.BAD_REQUEST, f"the request JSON nests deeper than "
                       f"{max_depth} levels", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object",
                       code="invalid_json")
    check_json(data, max_depth)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors()) from None


def _validation_error(errors: Any) -> APIError:
    """A 400 naming the first offending field (and listing every problem)."""
    def where(err: dict[str, Any]) -> str:
        # Union members add their type name to the location; drop those.
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        loc = [p for p in loc if not any(c in p for c in "[]()") and p not in
               ("str", "int", "float", "bool", "list", "dict", "function-after")]
        return ".".join(loc)
    def given(err: dict[str, Any]) -> str:
        value = err.get("input")
        if err.get("type") == "missing" or isinstance(value, (dict, list)):
            return ""
        text = repr(value)
        return f" (got {text[:40]}{'...' if len(text) > 40 else ''})"
    problems = [f"{where(e) or 'body'}: {e.get('msg')}{given(e)}" for e in errors]
    param = where(errors[0]) if errors else None
    return APIError(HTTPStatus.BAD_REQUEST, "invalid request: " + "; ".join(
        dict.fromkeys(problems)), param=param or None)


# --- the app ------------------------------------------------------------------------------------
@dataclass
class ServerState:
    """Everything the routes need, stored on app.state.peregrine; `metrics`, `ctx` and
    `engine` are the default model's."""

    args: ServerArgs
    router: ModelRouter
    metrics: ServerMetrics
    ctx: serving.ServingContext
    embeddings: EmbeddingService
    response_store: responses_api.ResponseStore

    @property
    def engine(self) -> AsyncLLMEngine:
        """The default model's engine (the one it will load on, while unloaded)."""
        return self.router.default.engine or self.ctx.engine


def _check_api_key(request: Request) -> None:
    state: ServerState = request.app.state.peregrine
    key = state.args.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":  # Anthropic's clients send the key as x-api-key
        given = request.headers.get("x-api-key", "")
    if not given or not hmac.compare_digest(given.strip().encode(), key.encode()):
        state.metrics.reject("unauthorized")
        raise APIError(HTTPStatus.UNAUTHORIZED, "Incorrect or missing API key: send "
                       "`Authorization: Bearer <key>`.", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def create_app(args: ServerArgs, config: EngineConfig,
               entries: list[ModelEntry] | None = None) -> FastAPI:
    """An app serving `config`'s model, or several (`entries`, which estimates their
    memory), and the --lora-modules adapters; engines start loading with the app's
    lifespan."""
    if entries is None:
        names = [args.served_model_name or resolve_model(config.model, config.load_format).name]
        if config.model and config.model not in names:
            names.append(config.model)
        entries = [ModelEntry(names[0], config, names[1:])]
    elif len(entries) > 1:
        for entry in entries:
            try:
                entry.memory_bytes = entry.memory_bytes or estimate_memory(entry.config)
            except Exception as e:  # noqa: BLE001 - an estimate missing is no reason to stop
                logger.warning("cannot estimate the memory of %s: %s", entry.name, e)
    adapters = parse_lora_modules(args.lora_modules or [])
    for _, base in adapters:  # an adapter's model serves adapters
        entry = next((e for e in entries if base in e.names), None) if base else entries[0]
        if entry is not None and not entry.config.enable_lora:
            entry.config = dataclasses.replace(entry.config, enable_lora=True)
    router = ModelRouter.build(entries, args)
    for request, base in adapters:
        router.add_adapter(request, base)
    return build_router_app(args, router)


def build_app(args: ServerArgs, engine: AsyncLLMEngine, metrics: ServerMetrics,
              model_names: list[str]) -> FastAPI:
    """The FastAPI app around one (unstarted) async engine."""
    entry = ModelEntry(model_names[0], engine.config, model_names[1:])
    slot = ModelSlot(entry, args, new_engine, engine, metrics)
    return build_router_app(args, ModelRouter([slot], args))


def build_router_app(args: ServerArgs, router: ModelRouter) -> FastAPI:
    """The FastAPI app around the router's models (loaded with the app's lifespan)."""
    ctx, metrics = router.default.ctx, router.default.metrics
    embeddings = EmbeddingService(ctx)
    store = responses_api.ResponseStore(args.responses_store_size)
    if args.semantic_cache:
        ctx.cache = SemanticCache(args, metrics, embeddings.load)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        router.start()
        # Load the embedding model and read the cache now, not on the first request.
        opening = asyncio.ensure_future(ctx.cache.open()) if ctx.cache else None
        try:
            yield
        finally:
            # uvicorn has already waited (shutdown_timeout) for in-flight requests.
            await router.shutdown()
            if opening is not None:
                await opening
                ctx.cache.close()

    app = FastAPI(title="peregrine", version=peregrine.__version__, lifespan=lifespan,
                  summary="OpenAI-compatible LLM server")
    app.state.peregrine = ServerState(args, router, metrics, ctx, embeddings, store)
    _add_error_handlers(app, metrics)
    app.add_middleware(BodySizeLimit, max_bytes=args.max_request_bytes)

    api = APIRouter(dependencies=[Depends(_check_api_key)])

    @api.post("/v1/completions", openapi_extra=json_body(CompletionRequest),
              responses=responses(CompletionResponse, stream=True))
    async def completions(request: Request) -> Response:
        req = await parse_body(request, CompletionRequest)
        async with router.lease(req.model) as model:
            return await serving.create_completion(model, req, request)

    @api.post("/v1/chat/completions", openapi_extra=json_body(ChatCompletionRequest),
              responses=responses(ChatCompletionResponse, stream=True))
    async def chat_completions(request: Request) -> Response:
        req = await parse_body(request, ChatCompletionRequest)
        async with router.lease(req.model) as model:
            return await serving.create_chat_completion(model, req, request)

    @api.post("/v1/embeddings", openapi_extra=json_body(EmbeddingRequest),
              responses=responses(EmbeddingResponse))
    async def create_embeddings(request: Request) -> Response:
        req = await parse_body(request, EmbeddingRequest)
        if embeddings.target(req.model) == "encoder":
            return await create_embedding(ctx, embeddings, req, request)
        async with router.lease(None):  # the default model pools its hidden states
            return await create_embedding(ctx, embeddings, req, request)

    @api.post("/v1/messages", openapi_extra=json_body(MessagesRequest),
              responses=responses(MessagesResponse, stream=True, error=AnthropicError))
    async def anthropic_messages(request: Request) -> Response:
        try:
            req = await parse_body(request, MessagesRequest)
            async with router.lease(req.model) as model:
                return await messages.create_message(model, req, request)
        except APIError as e:
            _count_rejection(metrics, e)
            return messages.error_response(e)

    @api.post("/v1/messages/count_tokens", openapi_extra=json_body(CountTokensRequest),
              responses=responses(CountTokensResponse, error=AnthropicError))
    async def anthropic_count_tokens(request: Request) -> Response:
        try:
            req = await parse_body(request, CountTokensRequest)
            async with router.lease(req.model) as model:
                return await messages.count_tokens(model, req)
        except APIError as e:
            _count_rejection(metrics, e)
            return messages.error_response(e)

    @api.post("/v1/responses", openapi_extra=json_body(ResponsesRequest),
              responses=responses(ResponseObject, stream=True))
    async def create_response(request: Request) -> Response:
        req = await parse_body(request, ResponsesRequest)
        async with router.lease(req.model) as model:
            return await responses_api.create_response(model, store, req, request)

    @api.get("/v1/responses/{response_id}",
             responses=responses(ResponseObject, STORED_ERRORS))
    async def get_response(response_id: str) -> Response:
        return responses_api.get_response(store, response_id)

    @api.delete("/v1/responses/{response_id}",
                responses=responses(ResponseDeleted, STORED_ERRORS))
    async def delete_response(response_id: str) -> Response:
        return responses_api.delete_response(store, response_id)

    @api.get("/v1/responses/{response_id}/input_items",
             responses=responses(InputItemList, (HTTPStatus.BAD_REQUEST, *STORED_ERRORS)))
    async def response_input_items(response_id: str,
                                   order: Literal["asc", "desc"] = "desc") -> Response:
        return responses_api.list_input_items(store, response_id, order)

    @api.get("/v1/models", responses=responses(ModelList, NO_BODY_ERRORS))
    async def models() -> ModelList:
        cards = [_card(slot) for slot in router.slots]
        for slot in router.slots:
            cards.extend(_adapter_card(slot, ctx) for ctx in slot.adapters.values())
        if embeddings.model_name is not None:
            encoder = embeddings.encoder
            cards.append(ModelCard(id=embeddings.model_name, root=args.embedding_model,
                                   max_model_len=encoder.max_seq_length if encoder else None,
                                   state="loaded" if encoder else "unloaded", task="embed"))
        return ModelList(data=cards)

    @api.post("/v1/models/{name}/load", responses=responses(ModelCard, NO_BODY_ERRORS))
    async def load_model(name: str) -> ModelCard:
        return _card(await router.load(name))

    @api.post("/v1/models/{name}/unload", responses=responses(ModelCard, NO_BODY_ERRORS))
    async def unload_model(name: str) -> ModelCard:
        return _card(await router.unload(name))

    @api.post("/v1/load_lora_adapter", openapi_extra=json_body(LoadLoRAAdapterRequest),
              responses=responses(None, media_type="text/plain"))
    async def load_lora_adapter(request: Request) -> PlainTextResponse:
        req = await parse_body(request, LoadLoRAAdapterRequest)
        try:
            lora = LoRARequest(req.lora_name, req.lora_path)
        except ValueError as e:
            raise APIError(HTTPStatus.BAD_REQUEST, str(e), param="lora_name") from None
        await router.load_adapter(lora, req.base_model_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @api.post("/v1/unload_lora_adapter", openapi_extra=json_body(UnloadLoRAAdapterRequest),
              responses=responses(None, media_type="text/plain"))
    async def unload_lora_adapter(request: Request) -> PlainTextResponse:
        req = await parse_body(request, UnloadLoRAAdapterRequest)
        await router.unload_adapter(req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed "
                                 "successfully.")

    @api.post("/tokenize", openapi_extra=json_body(TokenizeRequest),
              responses=responses(TokenizeResponse))
    async def tokenize(request: Request) -> TokenizeResponse:
        req = await parse_body(request, TokenizeRequest)
        async with router.lease(req.model) as model:
            return await _tokenize(model, req)

    async def _tokenize(ctx: serving.ServingContext, req: TokenizeRequest) -> TokenizeResponse:
        tok = ctx.ready().tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise APIError(HTTPStatus.BAD_REQUEST, "give exactly one of prompt and messages",
                           param="prompt")
        if req.messages is not None:
            # a count, not a generation: no cap on the prompt's length
            ids = (await serving.render_chat(ctx, req.messages, req.add_generation_prompt,
                                             capped=False)).token_ids
        else:
            ids = (await ctx.ready().tokenize([req.prompt or ""], req.add_special_tokens))[0]
        return TokenizeResponse(
            count=len(ids), max_model_len=ctx.ready().context_limit, tokens=ids,
            token_strs=[tok.id_to_token(i) for i in ids] if req.return_token_strs else None)

    @api.post("/detokenize", openapi_extra=json_body(DetokenizeRequest),
              responses=responses(DetokenizeResponse))
    async def detokenize(request: Request) -> DetokenizeResponse:
        req = await parse_body(request, DetokenizeRequest)
        async with router.lease(req.model) as model:
            tok = model.ready().tokenizer
            bad = [t for t in req.tokens if not 0 <= t < tok.vocab_size]
            if bad:
                raise APIError(HTTPStatus.BAD_REQUEST, f"token ids must be in [0, "
                               f"{tok.vocab_size}), got {bad[:5]}", param="tokens")
            return DetokenizeResponse(prompt=await model.ready().detokenize(req.tokens))

    app.include_router(api)

    @app.get("/health", response_class=PlainTextResponse,
             responses=responses(None, (HTTPStatus.SERVICE_UNAVAILABLE,),
                                 media_type="text/plain"))
    async def health() -> Response:
        engine = router.default.engine  # an unloaded default model (several models) is fine
        if engine is not None and not engine.is_ready:
            try:
                ctx.ready()
            except APIError as e:
                return e.response()
        return PlainTextResponse("", status_code=HTTPStatus.OK)

    @app.get("/metrics", responses=responses(None, (), media_type=CONTENT_TYPE))
    async def prometheus_metrics() -> Response:
        return Response(ServerMetrics.render_all(s.metrics for s in router.slots),
                        media_type=CONTENT_TYPE)

    @app.get("/version", responses=responses(VersionResponse, ()))
    async def version() -> VersionResponse:
        return VersionResponse(version=peregrine.__version__)

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(os.path.join(STATIC_DIR, "index.html"))

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    install(app, [MessagesRequest, CountTokensRequest, MessagesResponse, CountTokensResponse,
                  AnthropicError, CompletionRequest, ChatCompletionRequest, TokenizeRequest,
                  DetokenizeRequest,
                  EmbeddingRequest, CompletionResponse, ChatCompletionResponse,
                  EmbeddingResponse, ModelList, TokenizeResponse, DetokenizeResponse,
                  VersionResponse, ErrorResponse, ResponsesRequest, ResponseObject,
                  ResponseDeleted, InputItemList, LoadLoRAAdapterRequest,
                  UnloadLoRAAdapterRequest])
    return app


def _card(slot: ModelSlot) -> ModelCard:
    """A served model's entry in /v1/models."""
    engine = slot.engine
    ready = engine is not None and engine.is_ready
    return ModelCard(id=slot.name, root=engine.model_path if ready else None,
                     max_model_len=engine.context_limit if ready else None,
                     aliases=slot.entry.aliases, state=slot.state, pinned=slot.entry.pinned,
                     memory_bytes=slot.entry.memory_bytes or None)


def _adapter_card(slot: ModelSlot, ctx: serving.ServingContext) -> ModelCard:
    """A LoRA adapter's entry in /v1/models: a model whose parent is its base model."""
    lora = ctx.lora_request
    assert lora is not None
    engine = slot.engine
    ready = engine is not None and engine.is_ready
    return ModelCard(id=lora.lora_name, root=lora.lora_path, parent=slot.name,
                     max_model_len=engine.context_limit if ready else None, state=slot.state)


def _count_rejection(metrics: ServerMetrics, exc: APIError) -> None:
    if exc.status == HTTPStatus.BAD_REQUEST:
        metrics.reject("invalid")


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        _count_rejection(metrics, exc)
        if request.url.path.startswith("/v1/messages"):  # e.g. a 401 from the auth check
            return messages.error_response(exc)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.reject("invalid")
        return _validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    app.add_middleware(_InternalErrors)


class _InternalErrors:
    """Turn an exception escaping a route into a 500 in OpenAI's shape, and log it.

    An ASGI middleware rather than an `Exception` handler: Starlette re-raises after such a
    handler, and uvicorn then drops the connection under the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - one request fails, the server lives on
            logger.exception("request %s %s failed", scope.get("method"), scope.get("path"))
            if started:
                return  # mid-response: the client sees the stream end
            response = error_response(HTTPStatus.INTERNAL_SERVER_ERROR,
                                      f"internal error: {type(exc).__name__}: {exc}",
                                      code="internal_error")
            await response(scope, receive, send)


# --- `peregrine serve` --------------------------------------------------------------------------
def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


class _Server(uvicorn.Server):
    """uvicorn's server, with peregrine's graceful stop: on the first signal it stops taking
    requests (uvicorn) and gives in-flight ones `grace` seconds before aborting them in the
    engine, so every stream still ends properly (finish_reason "abort", then [DONE]); a
    second signal aborts them at once."""

    def __init__(self, config: uvicorn.Config, abort_all: Callable[[], None],
                 grace: float) -> None:
        super().__init__(config)
        self.abort_all = abort_all
        self.grace = grace

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            print(f"peregrine: shutting down: no new requests; in-flight ones get up to "
                  f"{self.grace:g}s to finish (Ctrl-C again aborts them)", file=sys.stderr,
                  flush=True)
            timer = threading.Timer(self.grace, self.abort_all)
            timer.daemon = True
            timer.start()
        else:
            self.abort_all()
        super().handle_exit(sig, frame)


def run_server(ns: argparse.Namespace, config: EngineConfig,
               entries: list[ModelEntry] | None = None) -> int:
    """Serve until Ctrl-C / SIGTERM, then stop cleanly; returns the process exit status."""
    args = ServerArgs.from_namespace(ns)
    app = create_app(args, config, entries)  # resolves the models: a bad one fails here
    state: ServerState = app.state.peregrine
    # uvicorn's own timeout is only a backstop: the engine aborts what is left at grace.
    server = _Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level="info" if ns.verbose else "warning",
        access_log=bool(ns.verbose), timeout_graceful_shutdown=args.shutdown_timeout + 10),
        state.router.abort_all, args.shutdown_timeout)
    url = f"http://{_display_host(args.host)}:{args.port}"
    print(f"peregrine: loading {state.ctx.model_name} ...", flush=True)
    on_demand = [s.name for s in state.router.slots if s not in state.router.preload]
    if on_demand:
        print(f"peregrine: loaded on their first request: {', '.join(on_demand)}", flush=True)
    failed = threading.Event()

    def announce() -> None:
        state.engine.loaded.wait()
        if state.engine.load_error is not None:
            print(f"peregrine: error: the model failed to load: {state.engine.load_error}",
                  file=sys.stderr, flush=True)
            failed.set()
            server.should_exit = True
            return
        print(f"peregrine: serving {state.ctx.model_name} "
              f"(loaded in {state.engine.load_time:.1f}s)\n"
              f"  playground:  {url}/\n"
              f"  OpenAI API:  {url}/v1   (metrics: {url}/metrics)", flush=True)

    threading.Thread(target=announce, name="peregrine-announce", daemon=True).start()
    # uvicorn re-raises the signal that stopped it once it is done; these handlers (which it
    # restores first) take it quietly, so a graceful stop exits 0 without a traceback.
    quiet = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in quiet.items():
            signal.signal(sig, handler)
    if failed.is_set():
        return 2
    print("peregrine: stopped", file=sys.stderr, flush=True)
    return 0

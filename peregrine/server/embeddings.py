"""/v1/embeddings: the embedding model (all-MiniLM-L6-v2 by default, loaded on its first
request) or the served LLM's pooled hidden states, chosen by the request's `model`.

Requests are batched like generation: inputs that arrive while a batch runs wait in a
queue and go together in the next one (one forward per padded batch of similar lengths),
computed off the event loop: the encoder in a worker thread, the LLM on the engine thread
between two steps."""

from __future__ import annotations

import asyncio
import base64
import logging
from http import HTTPStatus

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from peregrine.engine.async_engine import EngineNotReadyError
from peregrine.layers.pooling import PoolingType
from peregrine.models.errors import ModelLoadError, PromptTooLongError
from peregrine.models.sentence_encoder import (DEFAULT_EMBEDDING_ALIASES,
                                               DEFAULT_EMBEDDING_MODEL, SentenceEncoder,
                                               embedding_model_name, load_sentence_encoder)
from peregrine.server.context_budget import prompt_cut
from peregrine.server.embedding_batcher import EmbeddingBatcher
from peregrine.server.errors import APIError, bad_request
from peregrine.server.protocol import (EmbeddingData, EmbeddingRequest, EmbeddingResponse,
                                       EmbeddingUsage)
from peregrine.server.serving import ServingContext, _unless_disconnected

logger = logging.getLogger("peregrine.server")

class EmbeddingService:
    """The embedding model (lazily loaded) and the batchers of both models."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx
        spec = ctx.args.embedding_model
        self.model_name = None if spec is None else embedding_model_name(spec)
        names = [] if self.model_name is None else [self.model_name]
        if self.model_name == DEFAULT_EMBEDDING_MODEL:
            names += list(DEFAULT_EMBEDDING_ALIASES)
        self.model_names = names
        self.encoder: SentenceEncoder | None = None
        self.load_error: BaseException | None = None
        self._lock: asyncio.Lock | None = None
        self.encoder_batcher = EmbeddingBatcher[list[int]](self._run_encoder)
        self.decoder_batcher = EmbeddingBatcher[tuple[list[int], PoolingType]](self._run_decoder)

    async def load(self) -> SentenceEncoder:
        """The embedding model, loaded (in a worker thread) by the first call; a 503 if it
        cannot be loaded."""
        if self.encoder is not None:
            return self.encoder
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.encoder is None and self.load_error is None:
                spec = self.ctx.args.embedding_model
                assert spec is not None
                try:
                    encoder = await asyncio.to_thread(load_sentence_encoder, spec)
                    encoder.max_batch_tokens = self.ctx.args.embedding_batch_tokens
                    self.encoder = encoder
                    logger.info("loaded the embedding model %s", self.model_name)
                except (ModelLoadError, OSError) as e:
                    logger.error("the embedding model %s failed to load: %s", spec, e)
                    self.load_error = e
        if self.encoder is None:
            raise APIError(HTTPStatus.SERVICE_UNAVAILABLE, f"the embedding model "
                           f"{self.model_name} failed to load: {self.load_error}",
                           code="model_not_ready")
        return self.encoder

    async def _run_encoder(self, items: list[list[int]]) -> torch.Tensor:
        assert self.encoder is not None
        return await asyncio.to_thread(self.encoder.embed, items)

    async def _run_decoder(self, items: list[tuple[list[int], PoolingType]]) -> torch.Tensor:
        return await self.ctx.engine.embed([ids for ids, _ in items],
                                           [pool for _, pool in items])

    def target(self, name: str | None) -> str:
        """`encoder` or `decoder`: the model `name` asks for (none: the embedding model if
        one is served); a 404 for a model not served here."""
        if not name:
            return "encoder" if self.model_name is not None else "decoder"
        if name in self.model_names:
            return "encoder"
        if name in self.ctx.model_names:
            return "decoder"
        served = ", ".join(f"`{n}`" for n in [*self.model_names[:1], self.ctx.model_name])
        raise APIError(HTTPStatus.NOT_FOUND, f"The model `{name}` does not exist; this server "
                       f"embeds with {served}.", param="model", code="model_not_found")


def _inputs(req: EmbeddingRequest, max_inputs: int) -> list[str | list[int]]:
    """The request's inputs as a list of texts and token-id lists; 400 for an empty one."""
    given = req.input
    if isinstance(given, str):
        items: list[str | list[int]] = [given]
    elif given and isinstance(given[0], int):
        items = [list(given)]  # type: ignore[arg-type]
    else:
        items = list(given)  # type: ignore[arg-type]
    if not items:
        raise bad_request("input must not be empty", "input")
    if len(items) > max_inputs:
        raise bad_request(f"input holds {len(items)} inputs; at most {max_inputs} "
                          "(--max-embedding-inputs)", "input")
    for i, item in enumerate(items):
        if len(item) == 0:
            where = "input" if len(items) == 1 else f"input[{i}]"
            raise bad_request(f"{where} must not be empty", "input")
    return items


def _limit(req: EmbeddingRequest, model_limit: int) -> int | None:
    """Tokens each input is cut to (None: refuse longer ones instead)."""
    try:
        return prompt_cut(req.truncate_prompt_tokens, model_limit)
    except ValueError as e:
        raise bad_request(e, "truncate_prompt_tokens") from None


def _too_long(count: int, limit: int, model: str, exact: bool = True) -> APIError:
    return bad_request(f"input: an input has {'' if exact else 'at least '}{count} tokens; "
                       f"{model} takes at most {limit} (or set truncate_prompt_tokens)",
                       "input")


def _check_ids(ids: list[int], vocab: int, limit: int, cut: int | None,
               model: str) -> list[int]:
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"input: token ids must be in [0, {vocab}), got {bad[:5]}", "input")
    if cut is not None:
        return ids[:cut]
    if len(ids) > limit:
        raise _too_long(len(ids), limit, model)
    return ids


async def _encoder_ids(encoder: SentenceEncoder, items: list[str | list[int]],
                       cut: int | None) -> list[list[int]]:
    texts = [(i, t) for i, t in enumerate(items) if isinstance(t, str)]
    out: list[list[int]] = [[] for _ in items]
    if texts:
        try:
            encoded = await asyncio.to_thread(encoder.tokenize, [t for _, t in texts], cut)
        except PromptTooLongError as e:
            raise _too_long(e.count, e.limit, encoder.name) from None
        for (i, _), enc in zip(texts, encoded):
            out[i] = enc.token_ids
    for i, item in enumerate(items):
        if not isinstance(item, str):
            out[i] = _check_ids(item, encoder.vocab_size, encoder.max_seq_length, cut,
                                encoder.name)
    return out


async def _decoder_ids(ctx: ServingContext, items: list[str | list[int]],
                       cut: int | None) -> list[list[int]]:
    engine = ctx.ready()
    limit = ctx.prompt_limit()
    texts = [(i, t) for i, t in enumerate(items) if isinstance(t, str)]
    out: list[list[int]] = [[] for _ in items]
    if texts:
        try:
            encoded = await engine.tokenize([t for _, t in texts], True,
                                            None if cut is not None else limit)
        except PromptTooLongError as e:
            raise _too_long(e.count, e.limit, ctx.model_name, e.exact) from None
        for (i, _), ids in zip(texts, encoded):
            out[i] = ids[:cut] if cut is not None else ids
    vocab = engine.tokenizer.vocab_size
    for i, item in enumerate(items):
        if not isinstance(item, str):
            out[i] = _check_ids(item, vocab, limit, cut, ctx.model_name)
    return out


def _encode(row: torch.Tensor, fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(row.numpy().astype("<f4").tobytes()).decode("ascii")
    return row.tolist()


def _check_dimensions(req: EmbeddingRequest, dim: int, model: str) -> None:
    if req.dimensions is not None and req.dimensions != dim:
        # Neither model was trained to be cut (Matryoshka); a cut vector would mean little.
        raise bad_request(f"dimensions must be {dim} for {model} (its embeddings cannot be "
                          f"shortened), got {req.dimensions}", "dimensions")


async def create_embedding(ctx: ServingContext, service: EmbeddingService,
                           req: EmbeddingRequest, request: Request) -> Response:
    """POST /v1/embeddings."""
    target = service.target(req.model)
    items = _inputs(req, ctx.args.max_embedding_inputs)
    if target == "encoder":
        if req.pooling not in (None, "mean"):
            raise bad_request(f"pooling must be mean for {service.model_name} (it was trained "
                              f"with mean pooling); pooling applies to {ctx.model_name}",
                              "pooling")
        encoder = await service.load()
        model, dim = encoder.name, encoder.dim
        _check_dimensions(req, dim, model)
        ids = await _encoder_ids(encoder, items, _limit(req, encoder.max_seq_length))
        work = service.encoder_batcher.embed(ids)
    else:
        engine = ctx.ready()
        model, dim = ctx.model_name, engine.hidden_size
        _check_dimensions(req, dim, model)
        ids = await _decoder_ids(ctx, items, _limit(req, ctx.prompt_limit()))
        pooling: PoolingType = req.pooling or "last"
        work = service.decoder_batcher.embed([(x, pooling) for x in ids])
    try:
        rows = await _unless_disconnected(request, work, lambda: None)
    except EngineNotReadyError as e:
        raise APIError(HTTPStatus.SERVICE_UNAVAILABLE, str(e), code="model_not_ready",
                       headers={"Retry-After": "2"}) from None
    except ValueError as e:  # the engine's own checks of the ids (checked here first)
        raise bad_request(e, "input") from None
    count = sum(len(x) for x in ids)
    body = EmbeddingResponse(
        data=[EmbeddingData(index=i, embedding=_encode(row, req.encoding_format))
              for i, row in enumerate(rows)],
        model=model, usage=EmbeddingUsage(prompt_tokens=count, total_tokens=count))
    return JSONResponse(body.model_dump())

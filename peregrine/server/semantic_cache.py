"""The semantic cache of whole answers (--semantic-cache; docs/caching.md): which requests
it may answer, under what key, and the lookup (exact text, then vector search, then the
verifier) and store around one generation.

A request's key has two parts. The exact part is a hash of everything else the model sees
or is told: the served model, the API key (hashed), every request field that can change
the answer (sampling, max_tokens as resolved, stop, tools, response_format, seed, ...),
and the rendered prompt with the last user message cut out (system prompt, history,
template). The vector part is the embedding of the last user message (of the prompt, for
/v1/completions): the one place where a reworded request should still match, and short
enough for the embedding model to see whole (a long rendered prompt would be cut at 256
tokens, and its template boilerplate would pull every pair together).

The cache's own work (embedding one short text, the faiss search, SQLite) runs on a thread
of its own whose OpenMP pool is one thread: on a few cores, a second multi-threaded pool
spinning beside the engine's made each lookup many times slower (docs/caching.md)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from peregrine.outputs import CompletionOutput, RequestOutput
from peregrine.sampling_params import SamplingParams
from peregrine.server.args import ServerArgs
from peregrine.server.cache_verify import replaced_words, verify
from peregrine.server.embedding_batcher import EmbeddingBatcher
from peregrine.server.metrics import ServerMetrics
from peregrine.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest

if TYPE_CHECKING:  # faiss is imported only when the cache is on
    from peregrine.models.sentence_encoder import SentenceEncoder
    from peregrine.server.cache_store import CacheStore, Entry

T = TypeVar("T")
logger = logging.getLogger("peregrine.server")

# Request fields that do not change the answer (or are keyed separately: the messages and
# the prompt through the rendered context and the vector, the model by its served name).
_NOT_ANSWER_FIELDS = frozenset({"messages", "prompt", "model", "stream", "stream_options",
                                "user", "priority", "cache"})
# Candidates the vector search hands to the verifier (the closest first).
_CANDIDATES = 4
_WORD_MEMO = 4096
_STORED_REASONS = ("stop", "length")


def _one_omp_thread() -> None:
    # omp_set_num_threads sets the calling thread's OpenMP pool only (torch's ops on this
    # thread follow it too); the engine's threads keep theirs. torch.set_num_threads would
    # change a process-wide setting as well, so it is not called.
    import faiss
    faiss.omp_set_num_threads(1)


@dataclass(frozen=True)
class CacheKey:
    """Where a request's answer is filed: the exact part and the text the vector embeds."""

    exact: str
    query: str


def _hash(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode()
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def api_key_hash(headers: Mapping[str, str]) -> str:
    """A hash of the key the request presented (Bearer or x-api-key; none: "")."""
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        given = headers.get("x-api-key", "")
    return _hash(given.strip()) if given.strip() else ""


def _answer_fields(req: SamplingRequest, max_tokens: int | None) -> str:
    fields = req.model_dump(mode="json", exclude=set(_NOT_ANSWER_FIELDS))
    fields["resolved_max_tokens"] = max_tokens
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def _message_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(p.type == "text" and p.text is not None
                                         for p in content):
        return "\n".join(p.text for p in content)  # as chat_messages joins them
    return None


def chat_key(model: str, key_hash: str, req: ChatCompletionRequest, prompt_text: str | None,
             max_tokens: int | None) -> CacheKey | None:
    """The key of a chat request, or None when it has none (the last message is not the
    user's, or the template does not show it verbatim)."""
    last = req.messages[-1]
    query = _message_text(last.content)
    if last.role != "user" or not query or prompt_text is None:
        return None
    at = prompt_text.rfind(query)
    if at < 0:
        return None
    context = prompt_text[:at] + "\x00" + prompt_text[at + len(query):]
    return CacheKey(_hash("chat", model, key_hash, _answer_fields(req, max_tokens), context),
                    query)


def completion_key(model: str, key_hash: str, req: CompletionRequest,
                   max_tokens: int | None) -> CacheKey | None:
    """The key of a completions request with one text prompt (else None)."""
    p = req.prompt
    query = p if isinstance(p, str) else (p[0] if len(p) == 1 and isinstance(p[0], str)
                                          else None)
    if not query:
        return None
    return CacheKey(_hash("completion", model, key_hash, _answer_fields(req, max_tokens)),
                    query)


def bypass_reason(req: SamplingRequest, params: SamplingParams) -> str | None:
    """Why the cache must not answer (nor store) this request; None when it may."""
    if req.cache is False:
        return "refused"
    logprobs = getattr(req, "logprobs", None)
    wants_logprobs = logprobs is not False and logprobs is not None
    if (req.n != 1 or params.num_sequences != 1 or params.use_beam_search or wants_logprobs
            or getattr(req, "echo", False)):
        return "unsupported"
    if not params.greedy and req.cache is not True:
        return "sampled"  # another sample would be another answer: only when asked
    return None


@dataclass
class Probe:
    """One request's dealings with the cache: the lookup's result, and the store after a
    miss. status None: the cache is off (no X-Cache header)."""

    cache: SemanticCache | None = None
    status: str | None = None  # "hit" | "miss" | "bypass"
    key: CacheKey | None = None
    vector: np.ndarray | None = None
    answer: dict[str, Any] = field(default_factory=dict)
    similarity: float = 0.0

    @property
    def hit(self) -> bool:
        return self.status == "hit"

    @property
    def headers(self) -> dict[str, str]:
        """The X-Cache header (none while the cache is off)."""
        return {} if self.status is None else {"X-Cache": self.status}

    @property
    def usage(self) -> dict[str, Any]:
        """What a hit adds to `usage` (OpenAI's fields stay as they are)."""
        if not self.hit:
            return {}
        return {"cache": {"hit": True, "similarity": round(self.similarity, 4),
                          "saved_tokens": len(self.answer["token_ids"])}}

    def output(self, request_id: str, prompt: str | None,
               prompt_token_ids: list[int]) -> RequestOutput:
        """The cached answer as the engine's final output for this request."""
        a = self.answer
        return RequestOutput(request_id, prompt, prompt_token_ids, [CompletionOutput(
            0, a["text"], list(a["token_ids"]), finish_reason=a["finish_reason"],
            stop_reason=a["stop_reason"])], finished=True)

    async def replay(self, out: RequestOutput) -> AsyncIterator[RequestOutput]:
        """A hit as a stream: the whole answer in one output."""
        yield out

    async def store(self, out: RequestOutput) -> None:
        """File a completed answer after a miss (errors are logged, never raised)."""
        if self.status == "miss" and self.cache is not None:
            await self.cache.store(self, out)

    async def tap(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """Pass a stream through, storing its final output."""
        async for out in stream:
            yield out
            if out.finished:
                await self.store(out)


class SemanticCache:
    """The cache of one server: lookups and stores, on a store opened on first use."""

    def __init__(self, args: ServerArgs, metrics: ServerMetrics,
                 load_encoder: Callable[[], Awaitable[SentenceEncoder]],
                 clock: Callable[[], float] = time.time) -> None:
        self.args = args
        self.metrics = metrics
        self._load_encoder = load_encoder
        self._clock = clock
        self.encoder: SentenceEncoder | None = None
        self.storage: CacheStore | None = None
        self._lock: asyncio.Lock | None = None
        self._failed = False
        self._words: OrderedDict[str, np.ndarray] = OrderedDict()
        self._thread = ThreadPoolExecutor(1, "peregrine-cache", initializer=_one_omp_thread)
        self._batcher: EmbeddingBatcher[list[int]] | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def embed(self, texts: list[str]) -> np.ndarray:
        """Unit embeddings [N, dim] of `texts` (each cut to what the model sees); texts of
        concurrent lookups go through the model together."""
        encoder, batcher = self.encoder, self._batcher
        assert encoder is not None and batcher is not None
        ids = [e.token_ids for e in encoder.tokenize(texts, encoder.max_seq_length)]
        return torch.stack(await batcher.embed(ids)).numpy()

    async def open(self) -> CacheStore | None:
        """The store (opened, with the embedding model, by the first call); None if either
        failed (the cache then bypasses every request)."""
        if self.storage is not None or self._failed:
            return self.storage
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.storage is None and not self._failed:
                a = self.args
                try:
                    from peregrine.server.cache_store import CacheStore
                    self.encoder = encoder = await self._load_encoder()
                    self._batcher = EmbeddingBatcher[list[int]](
                        lambda batch: self._run(encoder.embed, batch))
                    self.storage = await self._run(
                        CacheStore, a.semantic_cache_path, encoder.dim, encoder.name,
                        a.semantic_cache_max_entries, a.semantic_cache_max_bytes,
                        a.semantic_cache_ttl, self._clock, self.metrics.cache_evicted)
                    self.metrics.watch_cache(lambda: len(self.storage or ()),
                                             lambda: self.storage.nbytes if self.storage else 0)
                except Exception:  # noqa: BLE001 - the server runs on, uncached
                    logger.exception("the semantic cache could not be opened; it is off")
                    self._failed = True
        return self.storage

    def close(self) -> None:
        """Close the store's file, after any write in flight."""
        self._thread.shutdown(wait=True)
        if self.storage is not None:
            self.storage.close()

    async def probe(self, key: CacheKey | None, bypass: str | None) -> Probe:
        """Look `key` up: a hit carries the answer; a miss the vector to store it under."""
        store = None if key is None or bypass else await self.open()
        if store is None or key is None:
            self.metrics.cache_result("bypass")
            return Probe(self, "bypass")
        started = time.perf_counter()
        probe = await self._lookup(store, key)
        self.metrics.cache_lookup.observe(time.perf_counter() - started)
        self.metrics.cache_result(probe.status or "miss")
        if probe.hit:
            self.metrics.cache_saved(len(probe.answer["token_ids"]), probe.answer["seconds"])
        return probe

    async def _lookup(self, store: CacheStore, key: CacheKey) -> Probe:
        exact = await self._run(store.exact, key.exact, key.query)
        if exact is not None:
            return await self._hit(store, key, exact, 1.0)
        vector = (await self.embed([key.query]))[0]
        for entry, similarity in await self._run(store.search, key.exact, vector, _CANDIDATES,
                                                 self.args.semantic_cache_threshold):
            reason = await self.check(entry.query, key.query)
            if reason is None:
                return await self._hit(store, key, entry, similarity)
            self.metrics.cache_rejected(reason)
        return Probe(self, "miss", key, vector)

    async def _hit(self, store: CacheStore, key: CacheKey, entry: Entry,
                   similarity: float) -> Probe:
        try:
            answer = json.loads(entry.payload)
        except ValueError:
            return Probe(self, "miss", key, (await self.embed([key.query]))[0])
        await self._run(store.touch, entry.id)
        return Probe(self, "hit", key, None, answer, similarity)

    async def check(self, cached: str, new: str) -> str | None:
        """The verifier's verdict on answering `new` with `cached`'s answer (None: yes)."""
        if not self.args.semantic_cache_verify:
            return None
        only_cached, only_new = replaced_words(cached, new)
        vectors = None
        if only_cached and only_new:
            vectors = await self._word_vectors(sorted(only_cached | only_new))
        return verify(cached, new, vectors)

    async def _word_vectors(self, words: list[str]) -> dict[str, np.ndarray]:
        missing = [w for w in words if w not in self._words]
        if missing:
            for w, v in zip(missing, await self.embed(missing)):
                self._words[w] = v
        out = {}
        for w in words:
            self._words.move_to_end(w)
            out[w] = self._words[w]
        while len(self._words) > _WORD_MEMO:
            self._words.popitem(last=False)
        return out

    async def store(self, probe: Probe, out: RequestOutput) -> None:
        """File `out` under the probe's key if it is a whole, single answer."""
        if (probe.key is None or probe.vector is None or len(out.outputs) != 1
                or out.outputs[0].finish_reason not in _STORED_REASONS):
            return
        o = out.outputs[0]
        m = out.metrics
        seconds = (m.finished_time - m.arrival_time
                   if m is not None and m.finished_time is not None else 0.0)
        payload = json.dumps({"text": o.text, "token_ids": o.token_ids,
                              "finish_reason": o.finish_reason, "stop_reason": o.stop_reason,
                              "seconds": seconds})
        try:
            assert self.storage is not None
            if await self._run(self.storage.add, probe.key.exact, probe.key.query,
                               probe.vector, payload) is not None:
                self.metrics.cache_stored()
        except Exception:  # noqa: BLE001 - the answer was sent; only its caching failed
            logger.exception("storing an answer in the semantic cache failed")


async def probe_chat(cache: SemanticCache | None, model: str, headers: Mapping[str, str],
                     req: ChatCompletionRequest, prompt_text: str | None,
                     params: SamplingParams) -> Probe:
    """Look a rendered chat request up (a Probe that does nothing when the cache is off)."""
    if cache is None:
        return Probe()
    key = chat_key(model, api_key_hash(headers), req, prompt_text, params.max_tokens)
    return await cache.probe(key, bypass_reason(req, params))


async def probe_completion(cache: SemanticCache | None, model: str,
                           headers: Mapping[str, str], req: CompletionRequest,
                           params: list[SamplingParams]) -> Probe:
    """Look a completions request up (one text prompt only; else a bypass)."""
    if cache is None:
        return Probe()
    key = None if len(params) != 1 else completion_key(model, api_key_hash(headers), req,
                                                       params[0].max_tokens)
    return await cache.probe(key, bypass_reason(req, params[0]))

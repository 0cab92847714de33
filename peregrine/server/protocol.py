"""The OpenAI-compatible wire format: request and response models (pydantic).

Requests accept OpenAI's fields plus vLLM's sampling extras (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, stop_token_ids, skip_special_tokens,
include_stop_str_in_output, priority) and structured outputs (response_format, or one of
regex / choice / grammar, vLLM's guided_* fields or structured_outputs). Unknown fields
are ignored, as OpenAI clients send some (`user`, `metadata`, ...) that change nothing
here. Types are strict, as OpenAI's are: "10" is not an integer and "yes" not a boolean;
numbers have OpenAI's ranges (the engine checks the rest of each field's domain)."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler,
                      model_serializer)

from peregrine.sampling_params import SamplingParams
from peregrine.structured.grammar import StructuredOutputs


# The bounds of a 64-bit integer: seeds and priorities go to torch and to C.
_INT64 = dict(ge=-(2**63), le=2**63 - 1)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False
    """Send a last chunk with `usage` (and empty `choices`) before [DONE]."""
    continuous_usage_stats: bool = False
    """vLLM extra: put the running `usage` in every chunk."""


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text, any JSON object, or a JSON schema
    ({"name", "schema", "strict"} under `json_schema`)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text", "json_object", "json_schema", "regex", "grammar", "structural_tag"]
    json_schema: dict[str, Any] | None = None

    def constraint(self) -> StructuredOutputs | None:
        """The constraint this format asks for (None for text); ValueError if unusable."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputs(json_object=True)
        if self.type == "json_schema":
            spec = self.json_schema or {}
            schema = spec.get("schema", spec.get("schema_"))
            if not isinstance(schema, (dict, str)):
                raise ValueError("response_format must carry the schema as "
                                 "json_schema.schema (an object)")
            return StructuredOutputs(json=schema)
        raise ValueError(f"response_format must be text, json_object or json_schema, got "
                         f"'{self.type}' (use the regex or grammar request fields)")


# Request fields that carry a constraint besides response_format, with the
# StructuredOutputs field each sets: ours, then vLLM's older `guided_*` names.
_CONSTRAINT_FIELDS = {"regex": "regex", "choice": "choice", "grammar": "grammar",
                      "guided_json": "json", "guided_regex": "regex",
                      "guided_choice": "choice", "guided_grammar": "grammar"}


class SamplingRequest(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=300)
    seed: int | None = Field(None, **_INT64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = Field(0, **_INT64)
    best_of: int | None = Field(None, ge=1)
    use_beam_search: bool = False
    beam_width: int | None = Field(None, ge=1)
    length_penalty: float = Field(1.0, ge=-100, le=100)
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    """vLLM's: keep only the prompt's last N tokens (-1: as many as fit the context)."""
    usage_detail: bool = False
    """peregrine's: add `energy` (joules and their source) and, when the server has a
    --price-per-hour, `cost_usd` to `usage` (docs/cost.md)."""
    # structured outputs (besides response_format); at most one per request
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None
    """vLLM's {"json" | "json_object" | "regex" | "choice" | "grammar": ...}."""
    cache: bool | None = None
    """peregrine extra, with --semantic-cache: true lets a sampled (temperature > 0) answer
    be cached and served; false neither looks up nor stores; unset caches greedy ones."""

    def constraint(self) -> tuple[StructuredOutputs | None, str | None]:
        """The request's structured-output constraint and the field that carries it;
        ValueError (naming the field) for two constraints or a malformed one."""
        given: list[tuple[str, Any]] = []
        if self.response_format is not None and self.response_format.type != "text":
            given.append(("response_format", None))
        given += [(name, {key: getattr(self, name)}) for name, key in _CONSTRAINT_FIELDS.items()
                  if getattr(self, name) is not None]
        if self.structured_outputs is not None:
            given.append(("structured_outputs", self.structured_outputs))
        if not given:
            return None, None
        if len(given) > 1:
            raise ValueError(f"{given[1][0]} must not be combined with {given[0][0]}: a request "
                             "takes at most one structured-output constraint")
        name, kwargs = given[0]
        if name == "response_format":
            return self.response_format.constraint(), name
        try:
            return StructuredOutputs(**kwargs), name
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} must be one valid constraint: {e}") from None

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The engine's SamplingParams; ValueError names a field that is out of range."""
        extra: dict[str, Any] = {}
        if self.best_of is not None and self.best_of != self.n:
            extra["best_of"] = self.best_of
        if self.use_beam_search:
            extra.update(use_beam_search=True, length_penalty=self.length_penalty,
                         beam_width=self.beam_width or max(self.n, self.best_of or 0, 4))
        # Fields SamplingParams declares too carry over; None keeps SamplingParams' default.
        same = {name: getattr(self, name) for name in _SAME_AS_PARAMS
                if getattr(self, name) is not None}
        return SamplingParams(**same, max_tokens=max_tokens, logprobs=logprobs,
                              stop=self.stop or [], structured=self.constraint()[0], **extra)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


# The request fields SamplingParams declares too (the others are mapped by hand).
_SAME_AS_PARAMS = sorted(set(SamplingParams.__dataclass_fields__) & set(
    SamplingRequest.model_fields) - {"max_tokens", "logprobs", "stop", "best_of",
                                     "use_beam_search", "beam_width", "length_penalty"})


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)
    suffix: str | None = None
    add_special_tokens: bool = True


class ContentPart(BaseModel):
    """Any content part; only `text` parts are understood (others get a 400)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class FunctionCall(_Request):
    """A call's function: its name and its arguments as a JSON text (OpenAI's shape)."""

    name: str
    arguments: str = "{}"


class ToolCall(_Request):
    """One tool call of an assistant message."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(_Request):
    """A function the model may call: name, description and a JSON schema of arguments."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Request):
    """An entry of `tools`."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    """`tool_choice` naming the one function the model must call."""

    type: Literal["function"]
    function: NamedFunction


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    """An assistant message's calls (sent back with the history)."""
    tool_call_id: str | None = None
    """A tool message's answer is to this call."""


class ChatDocument(_Request):
    """A retrieved passage for a RAG prompt (vLLM's {"title", "text"}, plus a score)."""

    text: str
    title: str | None = None
    score: float | None = None
    """Relevance: when every document has one, the highest go first."""


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ChatTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # vLLM extras
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[ChatDocument] | None = Field(None, max_length=1024)
    """Retrieved passages, most relevant first (or by `score`), fitted to a token budget."""
    documents_max_tokens: int | None = Field(None, ge=1)
    """At most this many tokens of documents (default: all the room the prompt leaves)."""
    truncation: Literal["auto", "disabled"] | None = None
    """auto: drop the oldest turns (never the system prompt or the last user turn) until the
    prompt leaves room for max_tokens; disabled: 400 instead. Default: --chat-truncation."""


class TokenizeRequest(_Request):
    """POST /tokenize: either `prompt` or chat `messages` (vLLM's shape)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Request):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]


class EmbeddingRequest(_Request):
    """POST /v1/embeddings (OpenAI's shape, plus vLLM's truncate_prompt_tokens and a
    `pooling` for the decoder model)."""

    input: str | list[str] | list[int] | list[list[int]]
    """A text, texts, a token-id sequence, or token-id sequences; none empty."""
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    """base64: each embedding as the base64 of its little-endian float32 bytes."""
    dimensions: int | None = Field(None, ge=1)
    """Must equal the model's size: neither model here is trained to be cut shorter."""
    user: str | None = None
    # extras
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    """vLLM extra: cut each input to its first k tokens (-1: to the model's limit) instead
    of refusing one that is too long."""
    pooling: Literal["last", "mean"] | None = None
    """The decoder model's pooling of its final hidden states (default: last); the
    embedding model pools as it was trained (mean) and takes no other."""


# --- responses ------------------------------------------------------------------------------
class TokenizeResponse(BaseModel):
    """POST /tokenize's answer."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str | None] | None = None


class DetokenizeResponse(BaseModel):
    """POST /detokenize's answer."""

    prompt: str


class VersionResponse(BaseModel):
    """GET /version's answer."""

    version: str


class PromptTruncation(BaseModel):
    """What was left out of the prompt to fit it (only when something was)."""

    dropped_messages: int = 0
    dropped_documents: int = 0
    cut_documents: int = 0
    dropped_tokens: int = 0


class UsageEnergy(BaseModel):
    """Joules a request used (its token share of each step's energy) and their source."""

    joules: float
    source: str  # nvml | rapl (measured) | model (docs/cost.md)


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict[str, int] | None = None
    truncation: PromptTruncation | None = None
    energy: UsageEnergy | None = None  # only when asked (usage_detail, --usage-energy)
    cost_usd: float | None = None  # only when asked and the server has --price-per-hour

    # No return annotation: with one, pydantic would publish that type (a bare object) as
    # the response schema instead of these fields.
    @model_serializer(mode="wrap")
    def _omit_unasked(self, handler: SerializerFunctionWrapHandler):  # noqa: ANN202
        # OpenAI's usage has no such keys: a response that did not ask keeps its exact shape
        data = handler(self)
        for key in ("energy", "cost_usd"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """POST /v1/embeddings' answer."""

    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "peregrine"
    root: str | None = None
    max_model_len: int | None = None
    aliases: list[str] = Field(default_factory=list)
    state: Literal["loaded", "loading", "unloaded", "failed"] | None = None
    pinned: bool = False
    memory_bytes: int | None = None  # weights + KV pool, estimated before loading
    task: Literal["generate", "embed"] = "generate"
    parent: str | None = None  # a LoRA adapter's base model (vLLM's field)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorInfo

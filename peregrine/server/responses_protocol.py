"""OpenAI's Responses API wire format (pydantic): the request with its input items, tools
and text format, and the response object with its output items. Requests are strict and
refuse unknown fields (a 400 naming the field): what this server does not do (built-in
tools, reasoning, background mode, ...) is refused rather than silently ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator)

# What a function's name may be (the chat API's rule).
_NAME = r"^[A-Za-z0-9_.\-]{1,64}$"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class InputText(_Request):
    """A text part of an input message (`output_text`: an assistant's, sent back)."""

    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class MessageItem(_Request):
    """A message: a string, or text parts (the shape of both input and output messages)."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallItem(_Request):
    """A call the model made (sent back with the history)."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(_Request):
    """The caller's answer to a function call."""

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


_ITEM_TYPES = ("message", "function_call", "function_call_output")


def _item_type(value: Any) -> str | None:
    kind = value.get("type", "message") if isinstance(value, dict) else \
        getattr(value, "type", None)
    return kind if kind in _ITEM_TYPES else None


InputItem = Annotated[Annotated[MessageItem, Tag("message")]
                      | Annotated[FunctionCallItem, Tag("function_call")]
                      | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
                      Discriminator(_item_type, custom_error_type="invalid_item",
                                    custom_error_message="input items must be messages, "
                                    "function_call or function_call_output items")]


class FunctionTool(_Request):
    """A function the model may call (Responses style: flat, not under `function`)."""

    type: Literal["function"]
    name: str = Field(pattern=_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionToolChoice(_Request):
    """`tool_choice` naming the one function the model must call."""

    type: Literal["function"]
    name: str


class TextFormat(_Request):
    """`text.format`: plain text, any JSON object, or JSON that follows `schema`."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Request):
    format: TextFormat = Field(default_factory=lambda: TextFormat(type="text"))


class ResponsesRequest(_Request):
    """POST /v1/responses."""

    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    """A system message for this response only (not carried by previous_response_id)."""
    previous_response_id: str | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stream: bool = False
    store: bool = True
    metadata: dict[str, str] | None = Field(None, max_length=16)
    text: TextConfig | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    """auto: drop the oldest turns to fit the context; default: --chat-truncation."""
    include: list[str] | None = Field(None, max_length=0)
    """Extra output data to include; none of OpenAI's kinds (reasoning, logprobs, tool
    results) is produced here, so only an empty list is accepted (agents SDKs send one)."""

    @field_validator("tools", mode="before")
    @classmethod
    def _only_functions(cls, tools: Any) -> Any:
        for tool in tools if isinstance(tools, list) else []:
            if isinstance(tool, dict) and tool.get("type") != "function":
                raise ValueError(f"only function tools are supported, got a "
                                 f"{tool.get('type')!r} tool")
        return tools


# --- the response -------------------------------------------------------------------------------
class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"] | None


class ResponseObject(BaseModel):
    """A response, as POST /v1/responses answers and GET /v1/responses/{id} returns it."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    error: dict[str, Any] | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputMessage | OutputFunctionCall]
    parallel_tool_calls: bool
    previous_response_id: str | None
    store: bool
    temperature: float | None
    top_p: float | None
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | None
    user: str | None
    metadata: dict[str, str]


class ResponseDeleted(BaseModel):
    """DELETE /v1/responses/{id}."""

    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


class InputItemList(BaseModel):
    """GET /v1/responses/{id}/input_items: the response's own input, newest first."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool = False

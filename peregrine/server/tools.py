"""Tool calling on the chat API: the tools into the prompt, the calls out of the text.

A model whose chat template knows tools gets them through the template (`tools=`) and
writes calls in its own syntax; a model whose template does not (SmolLM2) is taught the
Hermes syntax in its system prompt. The parser that reads calls back is chosen from the
template (Hermes/Qwen `<tool_call>`, Mistral `[TOOL_CALLS]`, Llama-3 JSON) or given with
--tool-call-parser. `tool_choice: "required"` or a named function is enforced with a JSON
schema constraint (the grammar engine), so those arguments always parse and validate;
`auto` finds calls in free text, as they are generated when streaming."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from peregrine.server.protocol import ChatTool, NamedToolChoice

PARSERS = ("hermes", "mistral", "llama3_json", "json")


def choose_parser(template: str | None, override: str | None = None) -> str:
    """The tool-call syntax of a model: --tool-call-parser, else read off its template."""
    if override:
        if override not in PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(PARSERS)}, got "
                             f"{override!r}")
        return override
    t = template or ""
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3_json"
    return "hermes"  # Qwen, Hermes, and the syntax taught to templates without tools


def template_knows_tools(template: str | None) -> bool:
    """Whether the chat template renders `tools` itself."""
    return bool(template) and re.search(r"\btools\b", template or "") is not None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class Call:
    """A parsed tool call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=new_call_id)


# --- the prompt ----------------------------------------------------------------------------
def system_prompt(tools: list[ChatTool]) -> str:
    """How a model whose template has no tools learns them: the Hermes convention."""
    specs = "\n".join(json.dumps(t.function.model_dump(exclude_none=True), ensure_ascii=False)
                      for t in tools)
    return ("You may call functions to help answer. The functions, as JSON schemas:\n"
            f"<tools>\n{specs}\n</tools>\n"
            "To call one, answer with a block per call:\n<tool_call>\n"
            '{"name": "<function name>", "arguments": {<arguments>}}\n</tool_call>\n'
            "and nothing else; otherwise answer normally.")


def prepare_messages(messages: list[dict[str, Any]], tools: list[ChatTool] | None,
                     knows_tools: bool) -> list[dict[str, Any]]:
    """Messages as the template gets them: calls and tool answers in the template's own
    fields when it knows tools, else written out in the taught syntax (with the tools in
    the system prompt)."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if calls:
            if knows_tools:
                m["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                    "name": c["function"]["name"],
                    "arguments": _as_object(c["function"]["arguments"])}} for c in calls]
            else:
                blocks = [json.dumps({"name": c["function"]["name"],
                                      "arguments": _as_object(c["function"]["arguments"])},
                                     ensure_ascii=False) for c in calls]
                m["content"] = (m.get("content") or "") + "".join(
                    f"<tool_call>\n{b}\n</tool_call>" for b in blocks)
        if m["role"] == "tool" and not knows_tools:
            m["content"] = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            m.pop("tool_call_id", None)
        out.append(m)
    if tools and not knows_tools:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + system_prompt(tools)}
        else:
            out.insert(0, {"role": "system", "content": system_prompt(tools)})
    return out


def _as_object(arguments: str) -> Any:
    """A call's arguments text as the object templates expect (the text if not JSON)."""
    try:
        return json.loads(arguments)
    except (TypeError, ValueError):
        return arguments


# --- forced calls: required / a named function ---------------------------------------------
def forced_schema(tools: list[ChatTool], choice: str | NamedToolChoice,
                  parallel: bool) -> dict[str, Any]:
    """The JSON schema the output must follow: a named function's arguments, or (required)
    an array of {"name", "arguments"} calls of the given tools."""
    if isinstance(choice, NamedToolChoice):
        return _parameters(_tool(tools, choice.function.name))
    calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                               "arguments": _parameters(t)},
              "required": ["name", "arguments"], "additionalProperties": False}
             for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def _tool(tools: list[ChatTool], name: str) -> ChatTool:
    for t in tools:
        if t.function.name == name:
            return t
    raise ValueError(f"tool_choice names {name!r}, which is not in tools")


def _parameters(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object"}


def forced_calls(text: str, choice: str | NamedToolChoice) -> list[Call]:
    """The calls in a forced output (which the grammar made valid JSON). A named call's
    arguments are the text as generated, as they stream (cut short by max_tokens, they are
    cut short, as OpenAI's are); of an array of calls cut short, the completed ones
    (ValueError if none)."""
    if isinstance(choice, NamedToolChoice):
        return [Call(choice.function.name, text)]
    return [Call(c["name"], json.dumps(c["arguments"], ensure_ascii=False))
            for c in _complete_items(text)]


def _complete_items(text: str) -> list[Any]:
    """The items of a JSON array, or of as much of it as was written whole."""
    decoder, items = json.JSONDecoder(), []
    at = text.index("[") + 1
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        if at >= len(text) or text[at] == "]":
            break
        try:
            item, at = decoder.raw_decode(text, at)
        except ValueError:
            break
        items.append(item)
    if not items:
        raise ValueError("no complete call in the output")
    return items


# --- free calls: auto ----------------------------------------------------------------------
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_calls(text: str, parser: str, names: set[str]) -> tuple[str | None, list[Call]]:
    """(the text outside calls or None, the calls) of a whole output. Only well-formed
    calls of known functions count; anything else stays text."""
    if parser == "hermes":
        calls = [c for m in _HERMES.finditer(text) for c in _objects(m.group(1), names)]
        if not calls:
            return text, []
        rest = _HERMES.sub("", text).strip()
        return rest or None, calls
    stripped = text.strip()
    if parser == "mistral":
        head, sep, tail = stripped.partition("[TOOL_CALLS]")
        calls = _objects(tail, names) if sep else []
        return (head.strip() or None, calls) if calls else (text, [])
    if parser == "llama3_json":
        body = stripped.removeprefix("<|python_tag|>")
        calls = [c for part in body.split(";") for c in _objects(part, names)]
        return (None, calls) if calls else (text, [])
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", stripped)
    calls = _objects(body, names)
    return (None, calls) if calls else (text, [])


def _objects(text: str, names: set[str]) -> list[Call]:
    """The calls in a JSON object or array of {"name", "arguments" | "parameters"}."""
    try:
        data = json.loads(text)
    except ValueError:
        return []
    items = data if isinstance(data, list) else [data]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return []
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return []
        if not isinstance(args, dict):
            return []
        calls.append(Call(item["name"], json.dumps(args, ensure_ascii=False)))
    return calls


# --- streaming -----------------------------------------------------------------------------
@dataclass
class Delta:
    """What one step of a stream adds: text, and tool-call pieces (OpenAI's delta shape)."""

    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


_START = "<tool_call>"
_END = "</tool_call>"
_NAME = re.compile(r'^\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:\s*(?=\S)',
                   re.DOTALL)


class StreamParser:
    """Turns a choice's text, as it grows, into content and tool-call deltas. Hermes calls
    stream their name as soon as it is read and their arguments as they come (holding back
    only what could be the call's closing brace); other syntaxes are read whole at the end.
    Forced outputs are the arguments themselves (named) or are read at the end (required)."""

    def __init__(self, parser: str, names: set[str],
                 forced: str | NamedToolChoice | None = None) -> None:
        self.parser = parser
        self.names = names
        self.forced = forced
        self.text = ""        # everything seen
        self.sent = 0         # chars of text emitted as content (hermes/other) or args
        self.calls: list[Call] = []
        self._call_start = -1  # index in text of the open <tool_call>'s body
        self._args_from = -1   # index in that body where the arguments begin (name read)
        self._named_open = False

    @property
    def called(self) -> bool:
        return bool(self.calls) or self._named_open

    def feed(self, new: str, finished: bool) -> Delta:
        """The delta for `new` text (and, when `finished`, everything held back)."""
        self.text += new
        if isinstance(self.forced, NamedToolChoice):
            return self._named(finished)
        if self.forced is not None:
            return self._whole(finished, lambda t: (None, forced_calls(t, self.forced)))
        if self.parser == "hermes":
            return self._hermes(finished)
        return self._whole(finished, lambda t: parse_calls(t, self.parser, self.names))

    def _named(self, finished: bool) -> Delta:
        out = Delta()
        if not self._named_open:
            self.calls.append(Call(self.forced.function.name, ""))  # type: ignore[union-attr]
            self._named_open = True
            out.tool_calls.append(self._start(0))
        if len(self.text) > self.sent:
            piece = self.text[self.sent:]
            self.calls[0].arguments += piece
            out.tool_calls.append(self._piece(0, piece))
            self.sent = len(self.text)
        return out

    def _whole(self, finished: bool, parse: Any) -> Delta:
        out = Delta()
        maybe_call = self.parser != "hermes" or self.forced is not None
        if not finished:
            if not maybe_call or not self._could_be_call():
                out.content, self.sent = self.text[self.sent:], len(self.text)
            return out
        try:
            content, calls = parse(self.text[self.sent:])
        except (ValueError, KeyError, TypeError):
            content, calls = self.text[self.sent:], []
        out.content = content or ""
        for call in calls:
            index = len(self.calls)
            self.calls.append(call)
            out.tool_calls += [self._start(index), self._piece(index, call.arguments)]
        self.sent = len(self.text)
        return out

    def _could_be_call(self) -> bool:
        if self.forced is not None:
            return True
        head = self.text.lstrip()
        marks = {"mistral": ["[TOOL_CALLS]"], "llama3_json": ["<|python_tag|>", "{"],
                 "json": ["{", "[", "```"]}[self.parser]
        return any(head.startswith(m) or m.startswith(head) for m in marks) or \
            (self.parser == "mistral" and "[TOOL_CALLS]" in self.text)

    def _hermes(self, finished: bool) -> Delta:
        out = Delta()
        while True:
            if self._call_start < 0:  # in text: up to the next <tool_call>
                at = self.text.find(_START, self.sent)
                if at < 0:
                    keep = 0 if finished else _partial_suffix(self.text, _START)
                    end = len(self.text) - keep
                    out.content += self.text[self.sent:end]
                    self.sent = end
                    return out
                out.content += self.text[self.sent:at]
                self._call_start = self.sent = at + len(_START)
                self._args_from = -1
                continue
            body_end = self.text.find(_END, self._call_start)
            body = self.text[self._call_start:] if body_end < 0 else \
                self.text[self._call_start:body_end]
            self._stream_call(body, out, closed=body_end >= 0 or finished)
            if body_end < 0:
                if finished:
                    self.sent = len(self.text)
                return out
            self.sent = body_end + len(_END)
            self._call_start = -1

    def _stream_call(self, body: str, out: Delta, closed: bool) -> None:
        if self._args_from < 0:  # the call's name is not read yet
            m = _NAME.match(body)
            if closed and (m is None or m.group(1) not in self.names):
                calls = _objects(body.strip(), self.names)  # any key order, read whole
                for call in calls:
                    i = len(self.calls)
                    self.calls.append(call)
                    out.tool_calls += [self._start(i), self._piece(i, call.arguments)]
                if not calls:  # not a call after all: it was text
                    out.content += _START + body + (_END if self.text.endswith(_END) else "")
                return
            if m is None or m.group(1) not in self.names:
                return
            self.calls.append(Call(m.group(1), ""))
            out.tool_calls.append(self._start(len(self.calls) - 1))
            self._args_from = m.end()
        index = len(self.calls) - 1
        if not closed:  # what may be the start of </tool_call> is not the arguments'
            body = body[:len(body) - _partial_suffix(body, _END)]
        args = body[self._args_from:].rstrip()
        if closed:  # the body ends with the call object's own closing brace
            args = args[:-1].rstrip() if args.endswith("}") else args
        else:  # hold back trailing braces: the last of them may be the call object's
            args = args.rstrip("}")
        new = args[len(self.calls[index].arguments):]
        if new:
            self.calls[index].arguments += new
            out.tool_calls.append(self._piece(index, new))

    def _start(self, index: int) -> dict[str, Any]:
        call = self.calls[index]
        return {"index": index, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": ""}}

    @staticmethod
    def _piece(index: int, text: str) -> dict[str, Any]:
        return {"index": index, "function": {"arguments": text}}


def _partial_suffix(text: str, mark: str) -> int:
    """Length of the longest end of `text` that begins `mark` (held back: it may be one)."""
    for n in range(min(len(mark) - 1, len(text)), 0, -1):
        if mark.startswith(text[-n:]):
            return n
    return 0

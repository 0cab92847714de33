"""Fitting a chat into the context: retrieved documents ranked into a token budget, and the
oldest turns of a history dropped until the prompt leaves room to answer.

The functions here are pure (messages in, messages out) except `fit_chat`, which renders
candidate prompts through a callable, so the policy can be read and tested on its own."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from peregrine.models.errors import PromptTooLongError

# How a user turn with documents reads when the chat template has no `documents` of its own:
# the context first, the question, then an explicit instruction to stay within the context.
RAG_TEMPLATE = ("[CONTEXT]\n{context}\n\n[QUESTION]\n{question}\n\n[INSTRUCTION]\nAnswer "
                "based on the context. If the answer is not in the context, say \"not found\".")
# A document is only cut to fit when this many of its tokens still fit; a shorter tail of a
# passage is more likely to mislead than to help.
MIN_CUT_TOKENS = 32


@dataclass
class Document:
    """A retrieved passage: its text, an optional title and relevance score."""

    text: str
    title: str | None = None
    score: float | None = None


@dataclass
class Truncation:
    """What fitting the prompt left out (reported in `usage.truncation`)."""

    dropped_messages: int = 0
    dropped_documents: int = 0
    cut_documents: int = 0
    dropped_tokens: int = 0

    def __bool__(self) -> bool:
        return any((self.dropped_messages, self.dropped_documents, self.cut_documents,
                    self.dropped_tokens))


def prompt_cut(truncate_prompt_tokens: int | None, limit: int) -> int | None:
    """How many (last) tokens of a prompt vLLM's truncate_prompt_tokens keeps within
    `limit`: -1 means the limit; None: no truncation; ValueError for 0."""
    k = truncate_prompt_tokens
    if k is None:
        return None
    if k == 0:
        raise ValueError("truncate_prompt_tokens must be -1 (the model's limit) or >= 1")
    return limit if k == -1 else min(k, limit)


def template_knows_documents(template: str | None) -> bool:
    """Whether the chat template renders `documents` itself (Command-R, Granite, ...)."""
    return bool(template) and re.search(r"\bdocuments\b", template or "") is not None


# --- history ----------------------------------------------------------------------------------
def history_turns(messages: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """The droppable turns of a chat, oldest first, as [start, end) index ranges.

    The leading system (or developer) messages and everything from the last user message on
    are kept; the messages between are cut into turns that each start at a user message, so
    an assistant's tool calls are always dropped together with their tool answers."""
    head = 0
    while head < len(messages) and messages[head]["role"] in ("system", "developer"):
        head += 1
    users = [i for i, m in enumerate(messages) if m["role"] == "user" and i >= head]
    tail = users[-1] if users else len(messages)
    starts = [head] + [i for i in users if head < i < tail]
    starts = sorted(set(s for s in starts if s < tail))
    return [(s, e) for s, e in zip(starts, starts[1:] + [tail])]


def without_turns(messages: Sequence[dict[str, Any]], turns: Sequence[tuple[int, int]],
                  count: int) -> list[dict[str, Any]]:
    """`messages` less the oldest `count` of `turns`."""
    if count <= 0:
        return list(messages)
    start, end = turns[0][0], turns[count - 1][1]
    return list(messages[:start]) + list(messages[end:])


# --- documents --------------------------------------------------------------------------------
def ranked(documents: Sequence[Document]) -> list[Document]:
    """Most relevant first: by score where every document has one, else as given."""
    if documents and all(d.score is not None for d in documents):
        return sorted(documents, key=lambda d: -(d.score or 0.0))  # stable for ties
    return list(documents)


def document_block(number: int, doc: Document) -> str:
    """One document as the RAG prompt lists it."""
    head = f"[{number}] {doc.title}" if doc.title else f"[{number}]"
    return f"{head}\n{doc.text}"


def rag_question(question: str, blocks: Sequence[str]) -> str:
    """The user turn of a RAG prompt: the fitted documents, the question, the instruction."""
    return RAG_TEMPLATE.format(context="\n\n".join(blocks) or "(no documents)",
                               question=question)


@dataclass
class FittedDocuments:
    """Documents chosen for a budget: as given to a template, and as RAG prompt blocks."""

    documents: list[Document] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    dropped: int = 0
    cut: int = 0


def fit_documents(documents: Sequence[Document], budget: int,
                  count: Callable[[str], int],
                  cut: Callable[[str, int], str]) -> FittedDocuments:
    """The most relevant documents whose blocks fit `budget` tokens together; the first one
    that does not fit whole is cut to the room left (when at least MIN_CUT_TOKENS), the rest
    are dropped. `count(text)` counts tokens; `cut(text, n)` keeps a text's first n tokens."""
    out = FittedDocuments()
    room = budget
    for doc in ranked(documents):
        block = document_block(len(out.blocks) + 1, doc)
        need = count(block) + 2  # the blank line between blocks
        if need <= room:
            out.documents.append(doc)
            out.blocks.append(block)
            room -= need
            continue
        text_room = room - (need - count(doc.text))
        if not out.cut and text_room >= MIN_CUT_TOKENS:
            short = Document(cut(doc.text, text_room), doc.title, doc.score)
            out.documents.append(short)
            out.blocks.append(document_block(len(out.blocks) + 1, short))
            out.cut, room = 1, 0
            continue
        out.dropped += 1
    return out


def with_documents(messages: Sequence[dict[str, Any]], blocks: Sequence[str]
                   ) -> list[dict[str, Any]]:
    """The chat with its last user turn rewritten as a RAG prompt over `blocks`."""
    out = [dict(m) for m in messages]
    last = max((i for i, m in enumerate(out) if m["role"] == "user"), default=None)
    if last is None:
        raise ValueError("documents need a user message to answer")
    out[last]["content"] = rag_question(out[last].get("content") or "", blocks)
    return out


# --- the whole prompt -------------------------------------------------------------------------
Render = Callable[[list[dict[str, Any]], int | None, dict[str, Any]],
                  Awaitable[tuple[str, list[int]]]]


@dataclass
class ChatFit:
    """How to fit one chat: the token limit, the history policy, the documents."""

    limit: int
    drop_history: bool = False
    documents: list[Document] | None = None
    documents_max_tokens: int | None = None
    template_documents: bool = False  # give documents to the template instead of our prompt


async def fit_chat(messages: list[dict[str, Any]], fit: ChatFit, render: Render,
                   count: Callable[[str], int], cut: Callable[[str, int], str]
                   ) -> tuple[str, list[int], Truncation]:
    """The rendered prompt and its ids within `fit.limit` tokens, and what was left out;
    PromptTooLongError when even the kept messages (system prompt and the last user turn
    on) do not fit. `render(messages, limit, template_kwargs)` renders and tokenizes."""
    report = Truncation()
    turns = history_turns(messages) if fit.drop_history else []
    kwargs: dict[str, Any] = {}
    if fit.documents:
        skeleton = without_turns(messages, turns, len(turns))
        base = len((await render(skeleton if fit.template_documents else
                                 with_documents(skeleton, []), None, {}))[1])
        budget = fit.limit - base
        if fit.documents_max_tokens is not None:
            budget = min(budget, fit.documents_max_tokens)
        chosen = fit_documents(fit.documents, max(budget, 0), count, cut)
        report.dropped_documents, report.cut_documents = chosen.dropped, chosen.cut
        if fit.template_documents:
            kwargs["documents"] = [{"title": d.title or "", "text": d.text}
                                   for d in chosen.documents]
        else:
            messages = with_documents(messages, chosen.blocks)

    async def fits(dropped: int) -> tuple[str, list[int]] | None:
        try:
            return await render(without_turns(messages, turns, dropped), fit.limit, kwargs)
        except PromptTooLongError:
            return None

    whole = await fits(0)
    if whole is not None or not turns:
        if whole is None:
            await render(messages, fit.limit, kwargs)  # raises the exact PromptTooLongError
        assert whole is not None
        return whole[0], whole[1], report
    # Fewest turns dropped that fit: the prompt shrinks as turns go, so bisect.
    lo, hi = 1, len(turns)
    best = await fits(hi)
    if best is None:
        await render(without_turns(messages, turns, hi), fit.limit, kwargs)
    while lo < hi:
        mid = (lo + hi) // 2
        got = await fits(mid)
        if got is None:
            lo = mid + 1
        else:
            hi, best = mid, got
    assert best is not None
    full = len((await render(messages, None, kwargs))[1])
    report.dropped_messages = turns[hi - 1][1] - turns[0][0]
    report.dropped_tokens = full - len(best[1])
    return best[0], best[1], report

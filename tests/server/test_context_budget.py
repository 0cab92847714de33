"""Fitting a prompt into the context: which turns of a history may go, how documents are
ranked into a token budget, and, through a running server, `truncation: "auto"`,
`documents` and vLLM's `truncate_prompt_tokens`, each equal to sending the fitted prompt
by hand, with what was left out reported in `usage.truncation`."""

from __future__ import annotations

import asyncio

import openai
import pytest

from peregrine.models.errors import PromptTooLongError
from peregrine.server.args import ServerArgs
from peregrine.server.context_budget import (MIN_CUT_TOKENS, ChatFit, Document, document_block,
                                             fit_chat, fit_documents, history_turns, prompt_cut,
                                             rag_question, ranked, with_documents,
                                             without_turns)

MODEL = "smollm2-135m"


def msg(role: str, content: str = "", **extra: object) -> dict[str, object]:
    return {"role": role, "content": content, **extra}


CHAT = [msg("system", "Be brief."),
        msg("user", "one"), msg("assistant", "two"),
        msg("user", "three"), msg("assistant", "", tool_calls=[{"id": "c1"}]),
        msg("tool", "four", tool_call_id="c1"), msg("assistant", "five"),
        msg("user", "six")]


# --- which turns may go -----------------------------------------------------------------------
def test_the_system_prompt_and_the_last_user_turn_are_never_droppable():
    turns = history_turns(CHAT)
    assert turns == [(1, 3), (3, 7)]
    assert without_turns(CHAT, turns, 2) == [CHAT[0], CHAT[7]]


def test_a_tool_call_goes_with_its_answer():
    (first, second) = history_turns(CHAT)
    kept = without_turns(CHAT, [first, second], 1)
    assert [m["role"] for m in kept] == ["system", "user", "assistant", "tool", "assistant",
                                         "user"]


def test_what_follows_the_last_user_message_is_kept():
    chat = CHAT + [msg("assistant", "", tool_calls=[{"id": "c2"}]),
                   msg("tool", "seven", tool_call_id="c2")]
    assert history_turns(chat) == [(1, 3), (3, 7)]


def test_a_chat_of_one_turn_has_nothing_to_drop():
    assert history_turns([msg("system", "s"), msg("user", "u")]) == []
    assert history_turns([msg("assistant", "hello"), msg("user", "u")]) == [(0, 1)]


# --- documents --------------------------------------------------------------------------------
def words(text: str) -> int:
    return len(text.split())


def first_words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


def test_documents_with_scores_go_most_relevant_first():
    docs = [Document("a", score=0.1), Document("b", score=0.9), Document("c", score=0.5)]
    assert [d.text for d in ranked(docs)] == ["b", "c", "a"]
    unscored = [Document("a"), Document("b", score=0.9)]
    assert ranked(unscored) == unscored  # not every one has a score: the given order


def test_documents_fill_the_budget_in_rank_order_then_one_is_cut_and_the_rest_dropped():
    long = " ".join(["w"] * 200)
    docs = [Document("alpha beta", "A", 0.9), Document(long, "B", 0.8),
            Document("gamma", "C", 0.1)]
    fitted = fit_documents(docs, 60, words, first_words)
    assert fitted.documents[0].text == "alpha beta" and fitted.cut == 1
    assert fitted.documents[1].title == "B" and MIN_CUT_TOKENS <= words(
        fitted.documents[1].text) < 60
    assert fitted.dropped == 1 and len(fitted.blocks) == 2
    assert fitted.blocks[0] == document_block(1, docs[0])


def test_a_document_is_not_cut_to_a_sliver():
    docs = [Document(" ".join(["w"] * 50)), Document(" ".join(["v"] * 50))]
    fitted = fit_documents(docs, 60, words, first_words)
    assert len(fitted.documents) == 1 and fitted.cut == 0 and fitted.dropped == 1


def test_the_rag_prompt_puts_context_question_and_instruction_in_the_last_user_turn():
    chat = with_documents([msg("system", "s"), msg("user", "Who?")], ["[1] T\nbody"])
    text = chat[-1]["content"]
    assert text.index("[CONTEXT]") < text.index("[1] T\nbody") < text.index("Who?") \
        < text.index("not found")
    assert chat[0] == msg("system", "s")
    with pytest.raises(ValueError, match="user message"):
        with_documents([msg("system", "s")], [])


# --- the whole fit, on a renderer that counts words -------------------------------------------
async def render_words(msgs, limit, extra):
    text = " ".join(str(m["content"]) for m in msgs)
    if limit is not None and words(text) > limit:
        raise PromptTooLongError(words(text), limit)
    return text, list(range(words(text)))


def fit(messages, **kw):
    return asyncio.run(fit_chat(messages, ChatFit(**kw), render_words, words, first_words))


def test_the_fewest_oldest_turns_go():
    chat = [msg("system", "s"), msg("user", "a " * 10), msg("assistant", "b " * 10),
            msg("user", "c " * 10), msg("assistant", "d " * 10), msg("user", "q")]
    text, ids, report = fit(chat, limit=25, drop_history=True)
    assert text.split() == ["s"] + ["c"] * 10 + ["d"] * 10 + ["q"]
    assert report.dropped_messages == 2 and report.dropped_tokens == 20


def test_a_prompt_that_fits_is_left_alone():
    text, ids, report = fit(CHAT, limit=100, drop_history=True)
    assert not report and len(ids) == words(text)


def test_without_drop_history_or_with_too_long_kept_messages_it_is_too_long():
    chat = [msg("system", "s " * 30), msg("user", "a"), msg("assistant", "b"), msg("user", "q")]
    with pytest.raises(PromptTooLongError):
        fit(chat, limit=10, drop_history=True)
    with pytest.raises(PromptTooLongError):
        fit(chat, limit=31)


def test_documents_take_the_room_the_kept_messages_leave():
    chat = [msg("system", "s"), msg("user", "old " * 30), msg("assistant", "x"),
            msg("user", "q")]
    docs = [Document(" ".join(["d"] * 40), score=1.0), Document("e " * 40, score=0.5)]
    text, ids, report = fit(chat, limit=90, drop_history=True, documents=docs)
    assert len(ids) <= 90 and "old" not in text and text.count("d") >= 40
    assert report.dropped_messages == 2 and report.dropped_documents + report.cut_documents == 1


def test_truncate_prompt_tokens_keeps_the_last_n_within_the_limit():
    assert prompt_cut(None, 100) is None
    assert prompt_cut(-1, 100) == 100 and prompt_cut(500, 100) == 100 and prompt_cut(7, 100) == 7
    with pytest.raises(ValueError):
        prompt_cut(0, 100)


def test_chat_truncation_is_auto_or_disabled():
    with pytest.raises(ValueError, match="chat-truncation"):
        ServerArgs(chat_truncation="sometimes")  # type: ignore[arg-type]


# --- through the server -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.api, api_key="unused")


def chat(client, messages, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kw)


HISTORY = [{"role": "system", "content": "You are a helpful assistant."}]
for i in range(6):
    HISTORY += [{"role": "user", "content": f"Tell me fact number {i} about the sea. " * 4},
                {"role": "assistant", "content": f"Fact {i}: the sea is salty and deep. " * 4}]
HISTORY.append({"role": "user", "content": "Summarize in one word."})


# A large max_tokens leaves little room for the prompt; a choice ends the answer at once.
SHORT = {"choice": ["sea", "salt", "deep"]}


def room_of(server, prompt_tokens: int) -> int:
    """max_tokens that leaves room for only `prompt_tokens` of prompt."""
    return server.engine.context_limit - prompt_tokens


def test_auto_truncation_equals_sending_the_kept_turns_by_hand(client, server):
    whole = chat(client, HISTORY, max_tokens=1)
    max_tokens = room_of(server, whole.usage.prompt_tokens - 60)
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, HISTORY, max_tokens=max_tokens)
    assert e.value.body["param"] == "messages"
    cut = chat(client, HISTORY, max_tokens=max_tokens,
               extra_body={"truncation": "auto", **SHORT})
    usage = cut.usage.model_extra["truncation"]
    dropped = usage["dropped_messages"]
    assert dropped % 2 == 0 and dropped >= 2
    assert usage["dropped_tokens"] == whole.usage.prompt_tokens - cut.usage.prompt_tokens
    assert cut.usage.prompt_tokens <= whole.usage.prompt_tokens - 60
    by_hand = chat(client, HISTORY[:1] + HISTORY[1 + dropped:], max_tokens=max_tokens,
                   extra_body=SHORT)
    assert by_hand.usage.prompt_tokens == cut.usage.prompt_tokens
    assert by_hand.choices[0].message.content == cut.choices[0].message.content
    assert by_hand.usage.model_extra["truncation"] is None


def test_when_even_the_kept_messages_leave_no_room_it_is_a_400_naming_messages(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, HISTORY, max_tokens=room_of(server, 5), extra_body={"truncation": "auto"})
    assert e.value.body["param"] == "messages" and "max_tokens" in e.value.body["message"]


def test_streamed_usage_reports_the_truncation(client, server):
    whole = chat(client, HISTORY, max_tokens=1)
    stream = chat(client, HISTORY, max_tokens=room_of(server, whole.usage.prompt_tokens - 60),
                  stream=True, stream_options={"include_usage": True},
                  extra_body={"truncation": "auto", **SHORT})
    usage = [c.usage for c in stream if c.usage is not None][-1]
    assert usage.model_extra["truncation"]["dropped_messages"] >= 2


DOCS = [{"title": "Rivers", "text": "The Nile is a long river in Africa.", "score": 0.2},
        {"title": "Cats", "text": "Cats sleep for most of the day.", "score": 0.9}]
QUESTION = [{"role": "user", "content": "How long do cats sleep?"}]


def test_documents_make_the_rag_prompt_most_relevant_first(client):
    with_docs = chat(client, QUESTION, max_tokens=12, extra_body={"documents": DOCS})
    blocks = [document_block(1, Document(DOCS[1]["text"], "Cats")),
              document_block(2, Document(DOCS[0]["text"], "Rivers"))]
    by_hand = chat(client, [{"role": "user", "content": rag_question(QUESTION[0]["content"],
                                                                     blocks)}], max_tokens=12)
    assert with_docs.usage.prompt_tokens == by_hand.usage.prompt_tokens
    assert with_docs.choices[0].message.content == by_hand.choices[0].message.content


def test_a_document_budget_drops_the_least_relevant(client):
    r = chat(client, QUESTION, max_tokens=4,
             extra_body={"documents": DOCS, "documents_max_tokens": 16})
    assert r.usage.model_extra["truncation"]["dropped_documents"] == 1
    alone = chat(client, QUESTION, max_tokens=4, extra_body={"documents": DOCS[1:]})
    assert alone.usage.prompt_tokens == r.usage.prompt_tokens


def test_truncate_prompt_tokens_keeps_the_last_tokens_of_a_completion_prompt(client):
    ids = list(range(1000, 1050))
    cut = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0,
                                    extra_body={"truncate_prompt_tokens": 10})
    by_hand = client.completions.create(model=MODEL, prompt=ids[-10:], max_tokens=5,
                                        temperature=0)
    assert cut.usage.prompt_tokens == 10 and cut.choices[0].text == by_hand.choices[0].text
    assert cut.usage.model_extra["truncation"]["dropped_tokens"] == 40


def test_truncate_prompt_tokens_on_a_chat_and_its_bad_value(client):
    r = chat(client, HISTORY, max_tokens=2, extra_body={"truncate_prompt_tokens": 20})
    assert r.usage.prompt_tokens == 20
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, QUESTION, max_tokens=2, extra_body={"truncate_prompt_tokens": 0})
    assert e.value.body["param"] == "truncate_prompt_tokens"

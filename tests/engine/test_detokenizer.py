"""Streaming detokenization with the real SmolLM2 tokenizer: multi-byte characters are never
shown broken, leading spaces survive, stop strings are found across token boundaries and
never shown half-printed, and what was shown is never taken back."""

from __future__ import annotations

import pytest

from peregrine.engine.detokenizer import IncrementalDetokenizer
from peregrine.models.tokenizer import Tokenizer

PROMPT = "Write something:"
TEXTS = ["Eagles 🦅 fly over 東京 and the café 🔥🔥!", "日本語のテキストです。",
         "emoji family 👨‍👩‍👧 and flags 🇫🇷🇯🇵 done", "naïve résumé — “quotes” ½ ∑ ≠ ∞",
         " leading space, then\nnew lines\n\n and\ttabs"]


@pytest.fixture(scope="module")
def tok(smollm2_path) -> Tokenizer:
    from peregrine.models.loader import load_tokenizer
    return load_tokenizer(smollm2_path)


def stream(tok: Tokenizer, text: str, stop: list[str] = (), include_stop: bool = False,
           skip_special_tokens: bool = True) -> tuple[list[str], IncrementalDetokenizer, int]:
    """Feed the tokens of `text` one at a time after a prompt; returns the visible text after
    each step, the detokenizer, and the number of tokens fed before it stopped."""
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT), skip_special_tokens, list(stop),
                                   include_stop)
    shown = []
    ids = tok.encode(text, add_special_tokens=False)
    for n, t in enumerate(ids, 1):
        if detok.update([t]) is not None:
            return shown, detok, n
        shown.append(detok.visible_text(finished=False))
    detok.flush()
    return shown, detok, len(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_text_streams_without_broken_characters(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    if any(ord(c) > 0x7F for c in text):  # the case is real: some token is a partial char
        assert any("\ufffd" in tok.decode([t]) for t in ids)
    shown, detok, _ = stream(tok, text)
    assert detok.text == text
    for prev, cur in zip(shown, shown[1:]):
        assert cur.startswith(prev), "streamed text was taken back"
    for s in shown:
        assert "\ufffd" not in s and text.startswith(s)


def test_leading_space_of_the_first_token_is_kept(tok):
    _, detok, _ = stream(tok, " world, again")
    assert detok.text == " world, again"


@pytest.mark.parametrize("include_stop", [False, True])
def test_stop_string_split_across_tokens_stops_and_is_trimmed(tok, include_stop):
    text = "The secret code is XYZZY-42 and then more text follows here."
    stop = "ZY-4"  # starts inside one token, ends inside another
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode(ids[:i]) for i in range(len(ids) + 1)]
    start = text.index(stop)
    first = next(i for i, p in enumerate(pieces) if len(p) > start)
    last = next(i for i, p in enumerate(pieces) if len(p) >= start + len(stop))
    assert last > first, "the stop string must span a token boundary for this test"
    shown, detok, fed = stream(tok, text, stop=[stop, "never appears"],
                               include_stop=include_stop)
    assert fed == last  # generation stops at the token that completes the stop string
    want = text[:start + len(stop)] if include_stop else text[:start]
    assert detok.text == want and detok.stopped == stop
    for s in shown:  # never a piece of the stop string while running
        assert want.startswith(s) and not s.endswith("ZY")


def test_visible_text_holds_back_only_a_possible_stop_prefix(tok):
    detok = IncrementalDetokenizer(tok, [], True, ["</answer>"], False)
    detok.text = "the result is </ans"
    assert detok.visible_text(finished=False) == "the result is "
    detok.text = "a < b"
    assert detok.visible_text(finished=False) == "a < b"
    detok.text = "ends with <"
    assert detok.visible_text(finished=False) == "ends with "
    assert detok.visible_text(finished=True) == "ends with <"


def test_special_tokens_are_skipped_or_kept(tok):
    text = "hello<|im_end|> there"
    _, skipped, _ = stream(tok, text)
    _, kept, _ = stream(tok, text, skip_special_tokens=False)
    assert skipped.text == "hello there"
    assert kept.text == text


def test_flush_emits_an_incomplete_final_character(tok):
    ids = tok.encode("ok 🦅", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], True, [], False)
    for t in ids[:-1]:  # stop mid-emoji
        detok.update([t])
    assert detok.text == "ok"  # the space waits with the partial emoji bytes
    detok.flush()
    assert detok.text.startswith("ok ") and detok.text.endswith("\ufffd")


def test_fork_is_independent(tok):
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT), True, [], False)
    for t in tok.encode(" one", add_special_tokens=False):
        detok.update([t])
    child = detok.fork()
    for t in tok.encode(" two", add_special_tokens=False):
        child.update([t])
    assert detok.text == " one" and child.text == " one two"


def test_stop_strings_before_min_tokens_are_ignored(tok):
    """Until min_tokens are out (the engine passes check_stop=False) a stop string does not
    end generation; one completed afterwards does, even if it began before."""
    ids = tok.encode(" one, stop, two, three stop here", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], True, ["stop"], False)
    found = []
    for n, t in enumerate(ids, 1):
        found.append(detok.update([t], check_stop=n > 4))
        if found[-1]:
            break
    assert found[-1] == "stop" and detok.text == " one, stop, two, three "

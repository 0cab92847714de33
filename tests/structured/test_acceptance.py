"""A sequence's matcher advances with each token; the sequence stops when the constraint is
complete, or (defensively) when a token breaks it."""

from __future__ import annotations

import pytest

pytest.importorskip("xgrammar")

from peregrine.models.loader import load_tokenizer  # noqa: E402
from peregrine.structured import GrammarCache, StructuredOutputs  # noqa: E402
from peregrine.structured.acceptance import accept_sampled  # noqa: E402


@pytest.fixture(scope="module")
def cache_tok(smollm2_path):
    tok = load_tokenizer(smollm2_path)
    return GrammarCache(tok, 49152), tok


def test_done_only_after_the_stop_token(cache_tok):
    cache, tok = cache_tok
    matcher = cache.matcher(StructuredOutputs(choice=["yes"]))
    assert not any(accept_sampled(matcher, t, "r") for t in tok.encode("yes"))
    assert accept_sampled(matcher, tok.eos_token_ids[0], "r")


def test_unconstrained_sequences_never_stop_here():
    assert not accept_sampled(None, 123, "r")


def test_a_token_outside_the_constraint_stops_the_sequence(cache_tok, caplog):
    cache, tok = cache_tok
    matcher = cache.matcher(StructuredOutputs(regex="[0-9]+"))
    assert accept_sampled(matcher, tok.encode("x")[0], "r")
    assert "breaks its structured-output constraint" in caplog.text

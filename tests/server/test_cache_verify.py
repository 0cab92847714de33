"""The semantic cache's verifier: a vector match is refused where meaning lives (numbers,
negations, names and their order, the requested format, a narrowing qualifier, a replaced
content word), and a
reworded question passes. On the labeled set (tests/data/semantic_cache_pairs.jsonl) the
cache at its default threshold keeps precision high and most of the recall, and the
verifier is what buys the precision."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

from peregrine.server.args import ServerArgs
from peregrine.server.cache_verify import REASONS, parse, replaced_words, stem, verify

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("cached, new, reason", [
    ("What is 15 times 7?", "What is 15 times 8?", "number"),
    ("What is 7 minus 3?", "What is 3 minus 7?", "number"),
    ("Give me three tips for studying.", "Give me five tips for studying.", "number"),
    ("Who was the first man on the Moon?", "Who was the second man on the Moon?", "number"),
    ("Is coffee good for you?", "Is coffee not good for you?", "negation"),
    ("Why do people like cats?", "Why don't people like cats?", "negation"),
    ("How can I bake bread with yeast?", "How can I bake bread without yeast?", "negation"),
    ("Is it safe to swim here?", "Is it unsafe to swim here?", "negation"),
    ("Is it possible to fly?", "Is it impossible to fly?", "negation"),
    ("What is the capital of France?", "What is the capital of Germany?", "entity"),
    ("Did Germany invade France?", "Did France invade Germany?", "order"),
    ("Convert USD to EUR.", "Convert EUR to USD.", "order"),
    ("List the planets as JSON.", "List the planets as a table.", "format"),
    ("Write a haiku about autumn.", "Write a limerick about autumn.", "format"),
    ("Reverse a string in Python.", "Reverse a string in JavaScript.", "format"),
    ("How do I sort a dictionary?", "How do I sort a dictionary by value?", "qualifier"),
    ("What is a good diet?", "What is a good diet for diabetics?", "qualifier"),
    ("How do I delete a file?", "How do I delete a file permanently?", "qualifier"),
    ("Explain photosynthesis in simple terms.", "Can you explain photosynthesis simply?",
     None),
    ("What is the capital of France?", "What is the population of France?", "content"),
    ("What is the capital of France?", "Tell me the capital of France.", None),
    ("How do I reverse a list in Python?", "How can I reverse a Python list?", None),
    ("what is the capital of japan", "What is the capital of Japan?", None),
    ("How can I turn a string into an integer?", "How can I convert a string to an integer?",
     "content"),
])
def test_each_check_names_what_differs(cached: str, new: str, reason: str | None) -> None:
    assert verify(cached, new) == reason
    assert verify(new, cached) == reason  # the verdict does not depend on which was cached


def test_a_replaced_word_passes_only_with_a_close_word_vector() -> None:
    only_cached, only_new = replaced_words("Who wrote Hamlet?", "Who is the author of Hamlet?")
    assert (only_cached, only_new) == ({"wrote"}, {"author"})
    near = {"wrote": np.array([1.0, 0.0]), "author": np.array([0.8, 0.6])}
    far = {"wrote": np.array([1.0, 0.0]), "author": np.array([0.0, 1.0])}
    assert verify("Who wrote Hamlet?", "Who is the author of Hamlet?", near) is None
    assert verify("Who wrote Hamlet?", "Who is the author of Hamlet?", far) == "content"
    assert verify("Who wrote Hamlet?", "Who is the author of Hamlet?", near, synonym=0.9) \
        == "content"


def test_words_only_added_or_dropped_are_left_to_the_similarity() -> None:
    assert replaced_words("Why does it rain?", "What causes rain?") == (set(), {"causes"})
    assert verify("Why does it rain?", "What causes rain?") is None


def test_parsing_keeps_sentence_openers_out_of_the_entities() -> None:
    p = parse("Explain how Paris grew. Tell me why NASA went to the Moon.")
    assert p.entities == ("paris", "nasa", "moon")
    assert parse("Paris is big.").entities == ("paris",)
    assert parse("I think France's wine is good").entities == ("france",)
    assert parse("Doesn't it? It can't, and never will.").negations == 3
    assert parse("Costs 1,000 dollars, or one thousand and a half").numbers == (
        1000.0, 1.0, 1000.0, 0.5)


def test_stemming_matches_forms_of_a_word() -> None:
    for a, b in [("sort", "sorting"), ("sorted", "sorts"), ("cookie", "cookies"),
                 ("study", "studies"), ("box", "boxes"), ("tire", "tires")]:
        assert stem(a) == stem(b), (a, b)
    assert stem("speed") != stem("spell")
    assert stem("class") == "class"
    assert stem("virus") == "virus"


# --- the labeled set ------------------------------------------------------------------------
def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_semantic_cache", os.path.join(ROOT, "scripts", "bench_semantic_cache.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_semantic_cache"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scored():
    bench = _bench()
    pairs = bench.load_pairs()
    return bench, pairs, bench.score_pairs(pairs)


def test_the_labeled_set_covers_every_kind_of_near_miss(scored) -> None:
    _, pairs, _ = scored
    assert len(pairs) >= 100
    kinds = {p["category"] for p in pairs}
    assert {"paraphrase", "number", "negation", "entity", "format", "qualifier",
            "content"} <= kinds
    assert all(p["should_hit"] == (p["category"] == "paraphrase") for p in pairs)


def test_at_the_default_threshold_the_verifier_buys_precision(scored) -> None:
    bench, pairs, scores = scored
    threshold = ServerArgs().semantic_cache_threshold
    with_verify = bench.precision_recall(pairs, scores, threshold, verified=True)
    without = bench.precision_recall(pairs, scores, threshold, verified=False)
    assert with_verify["precision"] >= 0.95
    assert with_verify["recall"] >= 0.8
    assert without["precision"] < 0.7  # the similarity alone serves many near-misses
    assert with_verify["false_hits"] < without["false_hits"]
    assert set(with_verify["rejected_by"]) <= set(REASONS)

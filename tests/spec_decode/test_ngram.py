"""N-gram prompt lookup proposes what followed the latest earlier match."""

from peregrine.spec_decode.ngram import propose_ngram


def test_proposes_the_continuation_of_the_longest_recent_match():
    toks = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3]
    assert propose_ngram(toks, k=3) == [4, 5, 9]


def test_prefers_the_latest_occurrence():
    toks = [7, 8, 1, 7, 8, 2, 7, 8]
    assert propose_ngram(toks, k=2, max_n=2) == [2, 7]


def test_no_match_gives_nothing():
    assert propose_ngram([1, 2, 3, 4], k=4) == []
    assert propose_ngram([5], k=4) == []


def test_stops_at_the_end_of_history():
    assert propose_ngram([3, 4, 3], k=5, max_n=1) == [4, 3]

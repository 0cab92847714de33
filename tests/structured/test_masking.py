"""Bitmask filling and applying: one row per constrained sequence, lookahead rows for
speculative drafts, and the same -inf pattern on every dtype."""

from __future__ import annotations

import pytest
import torch

xgr = pytest.importorskip("xgrammar")

from peregrine.models.loader import load_tokenizer  # noqa: E402
from peregrine.structured import GrammarCache, StructuredOutputs  # noqa: E402
from peregrine.structured.masking import apply_bitmask_, fill_bitmasks  # noqa: E402

V = 49152


@pytest.fixture(scope="module")
def cache_tok(smollm2_path):
    tok = load_tokenizer(smollm2_path)
    return GrammarCache(tok, V), tok


def mask_after(cache: GrammarCache, spec: StructuredOutputs, tokens: list[int]) -> torch.Tensor:
    """The next-token mask of a fresh matcher that accepted `tokens`."""
    m = cache.matcher(spec)
    assert all(m.accept_token(t) for t in tokens)
    bm = cache.allocate_bitmask(1)
    m.fill_next_token_bitmask(bm, 0)
    return bm[0]


def test_lookahead_rows_are_the_masks_after_each_accepted_draft(cache_tok):
    cache, tok = cache_tok
    spec = StructuredOutputs(regex=r"ab[0-9]{2}-[a-z]+")
    drafts = [tok.encode(c)[0] for c in "ab4"]
    m = cache.matcher(spec)
    bm = cache.allocate_bitmask(6)
    bm[4:] = 7  # sentinels: rows past the drafts stay untouched
    assert fill_bitmasks(bm, 1, m, drafts) == 3
    for j in range(4):
        assert torch.equal(bm[1 + j], mask_after(cache, spec, drafts[:j]))
    assert (bm[5] == 7).all()
    # The matcher is back where it started: it still accepts the whole text.
    assert all(m.accept_token(t) for t in tok.encode("ab12-x"))


def test_lookahead_counts_only_the_leading_drafts_the_grammar_accepts(cache_tok):
    cache, tok = cache_tok
    spec = StructuredOutputs(regex=r"[0-9]+")
    drafts = [tok.encode(c)[0] for c in "12x3"]
    bm = cache.allocate_bitmask(5)
    bm[3:] = 7
    assert fill_bitmasks(bm, 0, cache.matcher(spec), drafts) == 2
    assert (bm[3:] == 7).all()  # nothing filled past the rejected draft


def test_lookahead_stops_after_an_accepted_stop_token(cache_tok):
    cache, tok = cache_tok
    spec = StructuredOutputs(choice=["yes"])
    drafts = tok.encode("yes") + [tok.eos_token_ids[0], tok.encode("!")[0]]
    m = cache.matcher(spec)
    bm = cache.allocate_bitmask(len(drafts) + 1)
    assert fill_bitmasks(bm, 0, m, drafts) == len(drafts) - 1
    assert not m.is_terminated()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_apply_masks_only_the_listed_rows(cache_tok, dtype):
    cache, tok = cache_tok
    bm = cache.allocate_bitmask(3)
    m = cache.matcher(StructuredOutputs(choice=["yes", "no"]))
    m.fill_next_token_bitmask(bm, 1)
    bm[2] = 0  # a row not listed: must stay unmasked
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0)).to(dtype)
    before = logits.clone()
    apply_bitmask_(logits, bm, [1])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    firsts = {tok.encode("yes")[0], tok.encode("no")[0]}
    assert firsts <= set(allowed) and len(allowed) < 50
    assert torch.equal(logits[1][allowed], before[1][allowed])

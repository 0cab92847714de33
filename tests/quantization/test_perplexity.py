"""Perplexity: equals transformers' on the same tokens; chunking through the cache does not
change it; windows score every token once."""

from __future__ import annotations

import math

import pytest
import torch

from peregrine.models.loader import load_model
from peregrine.quantization.corpus import calibration_text, eval_text, read_text
from peregrine.quantization.perplexity import perplexity


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return load_model(smollm2_path)


@pytest.fixture(scope="module")
def ids(smollm2):
    return smollm2.tokenizer.encode(eval_text(), add_special_tokens=False)[:300]


def test_corpus_halves_do_not_overlap():
    text = read_text()
    assert len(text) > 250_000
    assert eval_text() + calibration_text() == text


def test_matches_transformers(smollm2, ids, hf_smollm2):
    hf, _ = hf_smollm2
    x = torch.tensor([ids])
    with torch.no_grad():
        want = math.exp(float(hf(x, labels=x).loss))
    got = perplexity(smollm2.model, ids, context=len(ids), chunk=len(ids))
    assert got.num_tokens == len(ids) - 1
    assert got.ppl == pytest.approx(want, rel=1e-4)


def test_chunking_through_the_cache_does_not_change_it(smollm2, ids):
    ids = ids[:150]
    whole = perplexity(smollm2.model, ids, context=len(ids), chunk=len(ids))
    chunked = perplexity(smollm2.model, ids, context=len(ids), chunk=37)
    assert chunked.ppl == pytest.approx(whole.ppl, rel=1e-4)


def test_sliding_windows_score_each_token_once(smollm2, ids):
    res = perplexity(smollm2.model, ids, context=128, stride=64)
    assert res.num_tokens == len(ids) - 1
    assert res.num_windows == 4
    again = perplexity(smollm2.model, ids, context=128, stride=64)
    assert again.ppl == res.ppl  # deterministic


def test_int8_kv_cache_ppl_within_one_percent(smollm2, ids):
    ref = perplexity(smollm2.model, ids, context=len(ids), chunk=32)
    q = perplexity(smollm2.model, ids, context=len(ids), chunk=32, kv_cache_dtype="int8")
    assert q.ppl != ref.ppl
    assert abs(q.ppl / ref.ppl - 1) < 0.01


def test_bad_arguments_are_named(smollm2, ids):
    with pytest.raises(ValueError, match="stride"):
        perplexity(smollm2.model, ids, context=16, stride=32)
    with pytest.raises(ValueError, match="context"):
        perplexity(smollm2.model, ids, context=1)

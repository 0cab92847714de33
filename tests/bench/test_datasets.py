"""Benchmark workloads: seeded random requests and JSONL files."""

from __future__ import annotations

import json

import pytest

from peregrine.bench.datasets import (file_requests, parse_range, random_requests,
                                      with_token_ids, workload_summary)
from peregrine.models.loader import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def test_parse_range():
    assert parse_range("32-512", "--input-len") == (32, 512)
    assert parse_range("128", "--input-len") == (128, 128)
    for bad in ("0-4", "9-3", "x", "1-y"):
        with pytest.raises(ValueError, match="--input-len"):
            parse_range(bad, "--input-len")


def test_random_requests_are_seeded_and_in_range(tok):
    a = random_requests(20, (5, 40), (3, 9), tok, seed=7)
    b = random_requests(20, (5, 40), (3, 9), tok, seed=7)
    c = random_requests(20, (5, 40), (3, 9), tok, seed=8)
    assert [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in b]
    assert [r.prompt_token_ids for r in a] != [r.prompt_token_ids for r in c]
    for r in a:
        assert 5 <= r.prompt_len <= 40 and len(r.prompt_token_ids) == r.prompt_len
        assert 3 <= r.output_len <= 9
        assert not any(tok.is_special(t) or t in tok.eos_token_ids for t in r.prompt_token_ids)
        assert r.engine_prompt() == {"prompt_token_ids": r.prompt_token_ids}
    assert len({r.prompt_len for r in a}) > 1  # lengths are drawn, not fixed


def test_text_prompts_are_measured_after_retokenizing(tok):
    reqs = random_requests(5, (20, 20), (4, 4), tok, seed=0, as_text=True)
    for r in reqs:
        assert isinstance(r.prompt, str) and r.prompt_token_ids is None
        assert r.prompt_len == len(tok.encode(r.prompt))
        assert r.api_prompt() == r.prompt
    ids = with_token_ids(reqs, tok)
    assert [r.prompt_token_ids for r in ids] == [tok.encode(r.prompt) for r in reqs]


def test_file_requests(tmp_path, tok):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "Hello there", "max_tokens": 5}) + "\n\n"
                    + json.dumps({"prompt_token_ids": [10, 11, 12]}) + "\n")
    reqs = file_requests(str(path), tok, default_max_tokens=9)
    assert [(r.prompt_len, r.output_len) for r in reqs] == [
        (len(tok.encode("Hello there")), 5), (3, 9)]
    summary = workload_summary(reqs)
    assert summary["num_requests"] == 2 and summary["output_tokens"] == 14
    assert len(file_requests(str(path), tok, limit=1)) == 1


@pytest.mark.parametrize("line,message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"text": "x"}), "needs 'prompt' or 'prompt_token_ids'"),
    (json.dumps({"prompt": "x", "max_tokens": 0}), "max_tokens must be an integer >= 1"),
])
def test_bad_file_lines_are_named(tmp_path, tok, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message) as e:
        file_requests(str(path), tok)
    assert "bad.jsonl:1" in str(e.value)

"""Constraints compile once, and their matchers accept exactly the constrained texts."""

from __future__ import annotations

import pytest

pytest.importorskip("xgrammar")

from peregrine.models.loader import load_tokenizer  # noqa: E402
from peregrine.structured import GrammarCache, StructuredOutputs  # noqa: E402


@pytest.fixture(scope="module")
def cache(smollm2_path):
    tok = load_tokenizer(smollm2_path)
    return GrammarCache(tok, 49152), tok


def accepts(cache_tok, spec: StructuredOutputs, text: str) -> bool:
    cache, tok = cache_tok
    m = cache.matcher(spec)
    return all(m.accept_token(t) for t in tok.encode(text)) and m.accept_token(
        tok.eos_token_ids[0]) and m.is_terminated()


def test_json_schema(cache):
    spec = StructuredOutputs(json={"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]})
    assert accepts(cache, spec, '{"name": "Ada", "age": 36}')
    assert not accepts(cache, spec, '{"name": "Ada"}')


def test_regex_choice_and_grammar(cache):
    assert accepts(cache, StructuredOutputs(regex=r"\d{3}-\d{4}"), "555-1234")
    assert not accepts(cache, StructuredOutputs(regex=r"\d{3}-\d{4}"), "55-1234")
    assert accepts(cache, StructuredOutputs(choice=["yes", "no"]), "no")
    assert not accepts(cache, StructuredOutputs(choice=["yes", "no"]), "maybe")
    g = 'root ::= "(" [a-z]+ ")"'
    assert accepts(cache, StructuredOutputs(grammar=g), "(abc)")


def test_compiled_grammars_are_cached(cache):
    c, _ = cache
    spec = StructuredOutputs(regex="[ab]+")
    before = c.hits
    assert c.compile(spec) is c.compile(StructuredOutputs(regex="[ab]+"))
    assert c.hits == before + 1


def test_invalid_specs_are_clear_errors(cache):
    c, _ = cache
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="invalid grammar"):
        c.compile(StructuredOutputs(grammar="root ::= ("))
    with pytest.raises(ValueError, match="invalid json"):
        c.compile(StructuredOutputs(json='{"type": "nonsense-type"}'))


def test_control_tokens_never_match_as_text(cache):
    """<file_sep> is one token whose text fits `"<" [a-z_]+ ">"`; it must not be allowed."""
    c, tok = cache
    m = c.matcher(StructuredOutputs(grammar='root ::= "<" [a-z_]+ ">"'))
    special = [i for i in range(32) if tok.is_special(i)]
    assert special
    assert not any(m.accept_token(i) for i in special)
    assert m.accept_token(tok.encode("<")[0])

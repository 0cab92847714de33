"""Constrained generation on the real model: every output satisfies its constraint, greedy
or sampled, n > 1 or not, and the unconstrained sequences of the same batch are untouched."""

from __future__ import annotations

import json
import re

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from peregrine import SamplingParams  # noqa: E402
from peregrine.structured import StructuredOutputs  # noqa: E402

NAME = {"type": "string", "minLength": 1, "maxLength": 12}
SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "city": NAME, "location": {"type": "object", "properties": {
            "lat": {"type": "number", "minimum": -90, "maximum": 90},
            "lon": {"type": "number", "minimum": -180, "maximum": 180}},
            "required": ["lat", "lon"], "additionalProperties": False}},
        "required": ["city", "location"], "additionalProperties": False},
    "array": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                 "minItems": 2, "maxItems": 3}},
        "required": ["tags"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "size": {"type": "integer", "minimum": 1, "maximum": 9},
        "ok": {"type": "boolean"}},
        "required": ["color", "size", "ok"], "additionalProperties": False},
}
PROMPTS = {
    "person": "Describe a person as JSON with a name and an age.",
    "nested": "Give a city and its coordinates as JSON.",
    "array": "List two or three tags about cooking as JSON.",
    "enum": "Pick a color, a size and a flag as JSON.",
}
MAX_TOKENS = 64


def chat_prompt(llm, text: str) -> dict:
    tok = llm.get_tokenizer()
    msgs = [{"role": "user", "content": text}]
    return {"prompt_token_ids": tok.encode_chat(msgs, True)}


def json_params(schema: dict, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, structured=StructuredOutputs(json=schema), **kw)


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_json_schemas_always_validate(smollm2_llm, mode):
    kw = dict(temperature=0) if mode == "greedy" else dict(temperature=0.7, seed=11)
    names = sorted(SCHEMAS)
    outs = smollm2_llm.generate([chat_prompt(smollm2_llm, PROMPTS[n]) for n in names],
                                [json_params(SCHEMAS[n], **kw) for n in names])
    for name, out in zip(names, outs):
        o = out.outputs[0]
        assert o.finish_reason == "stop", (name, o.text)
        jsonschema.validate(json.loads(o.text), SCHEMAS[name])
    smollm2_llm.engine.check_invariants()
    assert smollm2_llm.engine.kv.usage == 0


def test_n_samples_each_validate(smollm2_llm):
    schema = SCHEMAS["enum"]
    out = smollm2_llm.generate(chat_prompt(smollm2_llm, PROMPTS["enum"]),
                               json_params(schema, n=3, temperature=0.7, seed=5))[0]
    assert len(out.outputs) == 3
    for o in out.outputs:
        jsonschema.validate(json.loads(o.text), schema)


def test_json_object_regex_choice_and_grammar(smollm2_llm):
    llm = smollm2_llm
    regex = r"\d{3}-\d{4}"
    choices = ["positive", "negative", "neutral"]
    grammar = 'root ::= "(" [a-z]+ (", " [a-z]+)? ")"'
    specs = [StructuredOutputs(json_object=True), StructuredOutputs(regex=regex),
             StructuredOutputs(choice=choices), StructuredOutputs(grammar=grammar)]
    prompts = ["Give a JSON object with one short key and value.", "Write a phone number.",
               "Is 'I love it' positive or negative?", "Name two fruits in parentheses."]
    outs = llm.generate([chat_prompt(llm, p) for p in prompts],
                        [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, structured=s)
                         for s in specs])
    texts = [o.outputs[0].text for o in outs]
    assert all(o.outputs[0].finish_reason == "stop" for o in outs), texts
    assert isinstance(json.loads(texts[0]), dict)
    assert re.fullmatch(regex, texts[1])
    assert texts[2] in choices
    assert re.fullmatch(r"\([a-z]+(, [a-z]+)?\)", texts[3])


def test_plain_sequences_in_a_mixed_batch_are_unchanged(smollm2_llm):
    llm = smollm2_llm
    plain = [chat_prompt(llm, t) for t in ["Say hello.", "What is 2 + 2?"]]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    alone = [o.outputs[0].token_ids for o in llm.generate(plain, greedy)]
    mixed = llm.generate(
        [plain[0], chat_prompt(llm, PROMPTS["person"]), plain[1]],
        [greedy, json_params(SCHEMAS["person"], temperature=0), greedy])
    assert [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids] == alone
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), SCHEMAS["person"])


def test_logprobs_are_the_models_own(smollm2_llm):
    """The chosen token's logprob comes from the unmasked distribution (the mask decides
    which token, not how likely the model found it)."""
    llm = smollm2_llm
    prompt = chat_prompt(llm, "Answer yes or no: is the sky green?")
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, logprobs=5))[0]
    forced = llm.generate(prompt, SamplingParams(
        temperature=0, max_tokens=4, logprobs=5,
        structured=StructuredOutputs(choice=["maybe"])))[0].outputs[0]
    free_top = free.outputs[0].logprobs[0]
    first = forced.logprobs[0]
    for tok, lp in free_top.items():  # the same top-5 as without the constraint
        assert first[tok].logprob == pytest.approx(lp.logprob, abs=1e-5)
    chosen = forced.token_ids[0]
    assert first[chosen].logprob < max(lp.logprob for lp in free_top.values())


def test_ignore_eos_still_stops_when_the_constraint_is_complete(smollm2_llm):
    out = smollm2_llm.generate("Colour:", SamplingParams(
        temperature=0, max_tokens=20, ignore_eos=True,
        structured=StructuredOutputs(choice=["red", "blue"])))[0].outputs[0]
    assert out.text in ("red", "blue") and out.finish_reason == "stop"


def test_invalid_constraints_are_refused_before_queueing(smollm2_llm):
    engine = smollm2_llm.engine
    before = set(engine.requests)
    for spec in [StructuredOutputs(json='{"type": "not-a-type"}'),
                 StructuredOutputs(regex="(unclosed"),
                 StructuredOutputs(grammar="root ::= ")]:
        with pytest.raises(ValueError, match="invalid"):
            smollm2_llm.add_request("x", SamplingParams(structured=spec))
    assert set(engine.requests) == before
    assert not engine.scheduler.waiting and engine.kv.usage == 0
    ok = smollm2_llm.generate("x", SamplingParams(
        max_tokens=8, structured=StructuredOutputs(regex="[ab]{3}")))[0].outputs[0]
    assert re.fullmatch("[ab]{3}", ok.text)

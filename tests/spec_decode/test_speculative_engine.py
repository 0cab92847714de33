"""Speculative decoding in the engine: greedy output is token-identical to decoding without
it, for every proposer, alone and in batches, mixed with sequences that do not speculate,
through stops, preemption and the prefix cache; rejected drafts give their KV blocks back."""

from __future__ import annotations

import json

import pytest

from peregrine import LLM, SamplingParams
from tests.conftest import assert_engine_drained, make_tiny_llm, tiny_config_dir

TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins "
        "with a single step. All that glitters is not gold.")
CHATS = [[{"role": "user", "content": f"Repeat this text exactly: {TEXT}"}],
         [{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": f"Fix the typo: 'A jurney of a thousand miles.' {TEXT}"}]]
GREEDY = SamplingParams(temperature=0, max_tokens=40)


@pytest.fixture(scope="module")
def reference(smollm2_llm):
    return [o.outputs[0].token_ids for o in smollm2_llm.chat(CHATS, GREEDY)]


# An early exit of SmolLM2 guesses poorly: few drafts per step keep that case quick.
@pytest.mark.parametrize("spec, k", [("ngram", 4), ("draft:smollm2-135m", 4), ("layers:24", 1)])
def test_greedy_output_is_identical_with_speculation(spec, k, reference):
    llm = LLM(kv_cache_memory=0.3, speculative=spec, num_speculative_tokens=k)
    batched = [o.outputs[0].token_ids for o in llm.chat(CHATS, GREEDY)]
    alone = [llm.chat([c], GREEDY)[0].outputs[0].token_ids for c in CHATS[:2]]
    assert batched == reference and alone == reference[:2]
    stats = llm.engine.get_stats().spec_decode
    assert stats.num_draft_tokens > 0 and 0 < stats.acceptance_rate <= 1
    assert stats.mean_accepted_length == 1 + stats.num_accepted_tokens / stats.num_verifications
    if not spec.startswith("layers"):
        assert stats.acceptance_rate > 0.5
    assert_engine_drained(llm.engine)


def test_a_stop_string_inside_accepted_drafts_ends_the_output(smollm2_llm):
    params = SamplingParams(temperature=0, max_tokens=40, stop=["thousand"])
    want = smollm2_llm.chat(CHATS[:1], params)[0].outputs[0]
    llm = LLM(kv_cache_memory=0.3, speculative="ngram")
    got = llm.chat(CHATS[:1], params)[0].outputs[0]
    assert (got.text, got.finish_reason, got.stop_reason) == (want.text, "stop", "thousand")
    assert_engine_drained(llm.engine)


@pytest.fixture(scope="module")
def tiny_reference(tiny_model_dir):
    return make_tiny_llm(tiny_model_dir)


PROMPTS = [[1, 2, 3, 4, 5, 1, 2, 3], [7, 8, 9, 7, 8, 9, 7], [11, 12, 13, 14], [20, 21, 20, 21]]


def test_mixed_batch_only_eligible_sequences_speculate(tiny_model_dir, tiny_reference):
    """Penalties and logprobs need per-position state the verifier does not keep: those
    sequences decode one token at a time in the same batches, with the same output."""
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                             repetition_penalty=1.3),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)]
    want = tiny_reference.generate(PROMPTS, params)
    llm = make_tiny_llm(tiny_model_dir, speculative="ngram", num_speculative_tokens=3)
    got = llm.generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert got[2].outputs[0].logprobs == want[2].outputs[0].logprobs
    assert [len(o.outputs[0].token_ids) for o in got] == [24, 24, 24, 7]  # max_tokens exact
    assert llm.engine.get_stats().spec_decode.num_accepted_tokens > 0
    assert_engine_drained(llm.engine)


def test_preemption_and_prefix_cache_keep_greedy_output(tiny_model_dir, tiny_reference):
    """A pool too small for the batch preempts and recomputes; running the prompts again
    hits the prefix cache, which must hold only real tokens, never drafts."""
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in tiny_reference.generate(PROMPTS, params)]
    llm = make_tiny_llm(tiny_model_dir, speculative="layers:1", num_kv_blocks=24,
                        num_speculative_tokens=4)
    for _ in range(2):
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)] == want
    stats = llm.engine.get_stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert stats.spec_decode.num_draft_tokens > 0
    assert_engine_drained(llm.engine)


def test_sampling_with_speculation_is_reproducible_and_exact_in_length(tiny_model_dir):
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7, max_tokens=25,
                            ignore_eos=True)
    runs = []
    for _ in range(2):
        llm = make_tiny_llm(tiny_model_dir, speculative="layers:1")
        runs.append([o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)])
        assert_engine_drained(llm.engine)
    assert runs[0] == runs[1] and all(len(t) == 25 for t in runs[0])


@pytest.mark.parametrize("spec, message", [
    ("medusa", "speculative must be ngram"), ("layers:0", "speculative must be ngram"),
    ("layers:2", "fewer layers than the target's 2")])
def test_bad_speculative_settings_are_refused(tiny_model_dir, spec, message):
    with pytest.raises(ValueError, match=message):
        make_tiny_llm(tiny_model_dir, speculative=spec)


def test_a_small_draft_model_with_its_own_cache(tiny_model_dir, tiny_reference,
                                               tmp_path_factory):
    draft = tiny_config_dir(tmp_path_factory, num_hidden_layers=1, hidden_size=32)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in tiny_reference.generate(PROMPTS, params)]
    llm = make_tiny_llm(tiny_model_dir, speculative=f"draft:{draft}")
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)] == want
    assert llm.engine.get_stats().spec_decode.num_draft_tokens > 0
    assert_engine_drained(llm.engine)


def test_a_draft_model_with_another_vocabulary_is_refused(tiny_model_dir, tmp_path_factory):
    draft = tiny_config_dir(tmp_path_factory, vocab_size=1024)
    with pytest.raises(ValueError, match="same tokenizer"):
        make_tiny_llm(tiny_model_dir, speculative=f"draft:{draft}")


def test_structured_outputs_with_speculation(smollm2_llm):
    """Drafts are cut to what the grammar accepts and every verified position is masked:
    greedy JSON is the same as without speculation, and it validates."""
    jsonschema = pytest.importorskip("jsonschema")
    from peregrine.structured import StructuredOutputs
    schema = {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "string", "maxLength": 10},
                  "minItems": 3, "maxItems": 3},
        "count": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["items", "count"], "additionalProperties": False}
    params = SamplingParams(temperature=0, max_tokens=60,
                            structured=StructuredOutputs(json=schema))
    chats = [[{"role": "user", "content": "List apples, pears and plums as JSON with a "
                                          "count, like {\"items\": [\"apples\", \"pears\", "
                                          "\"plums\"], \"count\": 3}."}]] * 2
    want = smollm2_llm.chat(chats[:1], params)[0].outputs[0]
    llm = LLM(kv_cache_memory=0.3, speculative="ngram")
    got = llm.chat(chats, params)
    for out in got:
        assert out.outputs[0].token_ids == want.token_ids
        jsonschema.validate(json.loads(out.outputs[0].text), schema)
    assert llm.engine.get_stats().spec_decode.num_accepted_tokens > 0
    assert_engine_drained(llm.engine)

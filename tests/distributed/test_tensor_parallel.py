"""Tensor parallelism on two processes (gloo): an engine with tensor_parallel_size=2 gives
the tokens one process gives, through chunked prefill, prefix caching, preemption, forks
(n > 1) and embeddings, for GQA models with as many KV heads as ranks and with fewer
(replicated), and for int8 / int4 weights split in their packed form.

The tiny random models run in float64, where an all-reduce's different summation order
cannot flip a token (docs/distributed.md#exactness); the real model's tests are in
test_smollm2.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from peregrine import LLM, SamplingParams
from tests.conftest import tiny_config_dir
from tests.distributed.conftest import greedy_tokens

# Small enough to chunk every prompt and to preempt under the load below.
ENGINE = dict(load_format="dummy", dtype="float64", block_size=4, num_kv_blocks=40,
              max_num_batched_tokens=24, max_num_seqs=6, seed=7)
SHARED = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]  # a common prefix of 3 blocks


def whole_and_split(path: str, **split: int) -> Iterator[tuple[LLM, LLM]]:
    """(one process, the same model split by `split`) for a fixture to yield; the split
    engine's workers stop when the fixture ends."""
    with LLM(path, **split, **ENGINE) as two:
        yield LLM(path, **ENGINE), two


def workload() -> list[dict]:
    """Prompts sharing a prefix (prefix-cache hits), longer than a step's token budget
    (chunked prefill), and together more than the KV pool holds (preemption)."""
    return [{"prompt_token_ids": SHARED + [100 + i] * (3 + 5 * i)} for i in range(6)]


@pytest.fixture(scope="module", params=[2, 1], ids=["kv-heads=ranks", "kv-heads<ranks"])
def engines(request, tmp_path_factory):
    """(one process, two ranks) on the same tiny model: 4 query heads over 2 or 1 KV heads."""
    path = tiny_config_dir(tmp_path_factory, num_key_value_heads=request.param,
                           num_hidden_layers=3, vocab_size=515)
    yield from whole_and_split(path, tensor_parallel_size=2)


def test_greedy_tokens_match_one_process_through_chunking_caching_and_preemption(engines):
    one, two = engines
    want = greedy_tokens(one, workload())
    got = greedy_tokens(two, workload())
    assert got == want
    stats = two.engine.get_stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    two.engine.check_invariants()


def test_forked_samples_and_prompt_logprobs_match_one_process(engines):
    """n=3 seeded samples share the prompt's blocks and copy the last one on write (each
    rank copies in its own pool); prompt logprobs come from the gathered logits."""
    one, two = engines
    params = SamplingParams(n=3, temperature=0.9, seed=11, max_tokens=12, prompt_logprobs=2,
                            logprobs=2)
    prompt = {"prompt_token_ids": SHARED + [7, 8, 9]}
    a, b = one.generate(prompt, params)[0], two.generate(prompt, params)[0]
    assert [o.token_ids for o in b.outputs] == [o.token_ids for o in a.outputs]
    for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
        assert x.keys() == y.keys()
        for t in x:
            assert y[t].logprob == pytest.approx(x[t].logprob, abs=1e-9)


def test_embeddings_match_one_process(engines):
    one, two = engines
    prompts = [SHARED, [5, 6, 7, 8, 9, 10]]
    assert two.embed(prompts).allclose(one.embed(prompts), atol=1e-10)


def test_stats_say_the_parallel_sizes_and_where_each_rank_spends_a_step(engines):
    _, two = engines
    stats = two.engine.get_stats()
    assert (stats.tensor_parallel_size, stats.pipeline_parallel_size) == (2, 1)
    assert [r.rank for r in stats.ranks] == [0, 1]
    for r in stats.ranks:
        assert r.steps > 0 and r.step_seconds > 0
        assert 0 <= r.comm_seconds <= r.step_seconds
    from peregrine.server.metrics import _EngineCollector
    samples = {(m.name, s.labels.get("rank")): s.value
               for m in _EngineCollector(lambda: stats, "tiny").collect() for s in m.samples}
    assert samples[("peregrine:tensor_parallel_size", None)] == 2
    assert samples[("peregrine:pipeline_parallel_size", None)] == 1
    assert samples[("peregrine:rank_step_seconds", "1")] == stats.ranks[1].step_seconds


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_weights_split_in_their_packed_form(tmp_path_factory, quant):
    """int8 (per channel) and int4 (group 32) weights sliced as stored: in float64 the
    engine dequantizes them exactly, so two ranks give one process's tokens."""
    path = tiny_config_dir(tmp_path_factory, num_hidden_layers=2, hidden_size=128,
                           intermediate_size=256)
    opts = dict(ENGINE, quantization=quant, quantization_group_size=32 if quant == "int4"
                else None)
    prompts = workload()[:3]
    want = greedy_tokens(LLM(path, **opts), prompts, 16)
    with LLM(path, tensor_parallel_size=2, **opts) as two:
        assert greedy_tokens(two, prompts, 16) == want


def test_a_split_through_quantization_groups_is_refused_naming_what_fits(tmp_path_factory):
    """4 heads of 48: o_proj's 192 columns split 96 + 96, which cuts groups of 128."""
    path = tiny_config_dir(tmp_path_factory, hidden_size=192, intermediate_size=256)
    with pytest.raises(ValueError, match=r"o_proj: 96 input columns per rank cut its "
                                         r"quantization groups of 128 .*\[32\]"):
        LLM(path, tensor_parallel_size=2, quantization="int4", quantization_group_size=128,
            **{k: v for k, v in ENGINE.items() if k != "dtype"})

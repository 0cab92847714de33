"""Pipeline parallelism on two processes: the layers split into two stages, each step's
sequences cut into micro-batches that flow stage to stage; the tokens are one process's,
through chunked prefill, prefix caching (including hits on blocks filled in the same step,
which keep such a step in one micro-batch), preemption and forks. Tiny random models in
float64; the real model's test is in test_smollm2.py."""

from __future__ import annotations

import pytest

from peregrine import LLM, SamplingParams
from tests.conftest import tiny_config_dir
from tests.distributed.conftest import greedy_tokens
from tests.distributed.test_tensor_parallel import ENGINE, SHARED, whole_and_split, workload


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """(one process, two stages) on a tiny model of 5 layers: stages of 3 and 2."""
    path = tiny_config_dir(tmp_path_factory, num_hidden_layers=5, vocab_size=515)
    yield from whole_and_split(path, pipeline_parallel_size=2)


def test_greedy_tokens_match_one_process_through_chunking_caching_and_preemption(engines):
    one, two = engines
    assert greedy_tokens(two, workload()) == greedy_tokens(one, workload())
    stats = two.engine.get_stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert (stats.tensor_parallel_size, stats.pipeline_parallel_size) == (1, 2)
    two.engine.check_invariants()


def test_prompts_sharing_blocks_filled_in_the_same_step_match_one_process(engines):
    """Four copies of one prompt admitted together: the later ones hit the blocks the first
    fills in that very step, and a micro-batch must not read them before they are written."""
    one, two = engines
    prompts = [{"prompt_token_ids": SHARED + [40, 41, 42, 43, 44]}] * 4
    assert greedy_tokens(two, prompts, 8) == greedy_tokens(one, prompts, 8)


def test_forked_samples_match_one_process(engines):
    one, two = engines
    params = SamplingParams(n=3, temperature=0.8, seed=5, max_tokens=10)
    prompt = {"prompt_token_ids": SHARED + [1, 2]}
    a, b = one.generate(prompt, params)[0], two.generate(prompt, params)[0]
    assert [o.token_ids for o in b.outputs] == [o.token_ids for o in a.outputs]


def test_tensor_and_pipeline_parallel_together_match_one_process(tmp_path_factory):
    """2 x 2 ranks: the stage boundary sends the stream between tensor-parallel peers and the
    first stage's ranks compute the logits."""
    path = tiny_config_dir(tmp_path_factory, num_hidden_layers=4, vocab_size=515)
    prompts = workload()[:4]
    want = greedy_tokens(LLM(path, **ENGINE), prompts, 12)
    with LLM(path, tensor_parallel_size=2, pipeline_parallel_size=2, **ENGINE) as four:
        assert greedy_tokens(four, prompts, 12) == want
        assert [r.rank for r in four.engine.get_stats().ranks] == [0, 1, 2, 3]

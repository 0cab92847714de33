"""The real default model (SmolLM2-135M: 9 query heads over 3 KV heads, so two tensor-
parallel ranks take 2 and 1 GQA groups) split over two processes.

In float32 an all-reduce adds the ranks' partial sums in another order than one matrix
product does, so logits differ in the last bits (about 1e-5 here, checked with a
tolerance) and greedy tokens stay identical over 32 tokens on these prompts (a near-tie
could flip one; docs/distributed.md#exactness). int8 activations (the int4 and GGUF
kernels) amplify those bits into whole quantization steps: there the split model is held
to the same distance from the eager reference as the engine's own fused step is."""

from __future__ import annotations

import pytest
import torch

from peregrine import LLM, SamplingParams
from tests.distributed.conftest import greedy_tokens

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a land far away,", "The three primary colors are"]
STORY = ("Once upon a time, in a land far away, there lived a small dragon who loved to read "
         "books about the sea.")
ENGINE = dict(kv_cache_memory=0.25, num_threads=1)


def prompt_logprobs(llm: LLM) -> torch.Tensor:
    """The logprob of each token of STORY after its prefix."""
    out = llm.generate(STORY, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    return torch.tensor([next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]])


@pytest.fixture(scope="module")
def reference():
    """One process, float32: greedy tokens and prompt logprobs."""
    llm = LLM(quantization="none", **ENGINE)
    return greedy_tokens(llm, PROMPTS), prompt_logprobs(llm)


def _check_float(llm: LLM, reference) -> None:
    tokens, logprobs = reference
    assert greedy_tokens(llm, PROMPTS) == tokens
    torch.testing.assert_close(prompt_logprobs(llm), logprobs, rtol=0, atol=1e-3)


def test_tensor_parallel_float_matches_one_process(reference):
    with LLM(quantization="none", tensor_parallel_size=2, **ENGINE) as llm:
        _check_float(llm, reference)


@pytest.mark.slow
def test_pipeline_parallel_float_matches_one_process(reference):
    """Fast sibling: test_pipeline_parallel.py on a tiny model."""
    with LLM(quantization="none", pipeline_parallel_size=2, **ENGINE) as llm:
        _check_float(llm, reference)


@pytest.mark.slow
def test_int8_weights_split_give_the_eager_tokens():
    """Per-channel int8 (int16 activations, no activation rounding steps): greedy tokens
    identical to one process's eager path. Fast sibling: test_tensor_parallel.py."""
    opts = dict(quantization="int8", enforce_eager=True, **ENGINE)
    want = greedy_tokens(LLM(**opts), PROMPTS)
    with LLM(tensor_parallel_size=2, **opts) as llm:
        assert greedy_tokens(llm, PROMPTS) == want


@pytest.mark.slow
@pytest.mark.parametrize("quant,group", [("int4", 32), ("gguf", None)])
def test_int4_weights_split_stay_as_close_to_eager_as_the_fused_step(quant, group):
    """int4 group 32 and the GGUF's own Q4_1/Q8_0 blocks under two ranks: prompt logprobs
    within the distance that separates the engine's fused step from its eager modules on
    one process (on this prompt about 0.07 mean, 0.23 max, measured in the test)."""
    opts = dict(quantization=quant, quantization_group_size=group, **ENGINE)
    eager = prompt_logprobs(LLM(enforce_eager=True, **opts))
    fused = prompt_logprobs(LLM(**opts))
    with LLM(tensor_parallel_size=2, **opts) as llm:
        split = prompt_logprobs(llm)
    own = (fused - eager).abs()
    diff = (split - eager).abs()
    assert diff.mean() <= 2 * own.mean() and diff.max() <= 2 * own.max()

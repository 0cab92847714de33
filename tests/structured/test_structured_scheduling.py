"""Constrained sequences through preemption, chunked prefill and small batches: the same
greedy tokens as when run alone, and always inside the constraint (tiny float64 model)."""

from __future__ import annotations

import random
import re

import pytest

pytest.importorskip("xgrammar")

from peregrine import SamplingParams  # noqa: E402
from peregrine.structured import StructuredOutputs  # noqa: E402
from tests.conftest import make_tiny_llm  # noqa: E402

REGEX = r"[a-f]{2,12}-[0-9]{1,6}"


def workload(n: int) -> tuple[list[dict], list[SamplingParams]]:
    """Prompts of random ids; every third request unconstrained, the rest under REGEX."""
    rng = random.Random(3)
    prompts, params = [], []
    for i in range(n):
        ids = [rng.randrange(512) for _ in range(rng.randrange(4, 40))]
        prompts.append({"prompt_token_ids": ids})
        spec = None if i % 3 == 2 else StructuredOutputs(regex=REGEX)
        params.append(SamplingParams(temperature=0, max_tokens=24, structured=spec))
    return prompts, params


@pytest.fixture(scope="module")
def alone(tiny_model_dir):
    llm = make_tiny_llm(tiny_model_dir)
    prompts, params = workload(24)
    return [llm.generate(p, sp)[0].outputs[0] for p, sp in zip(prompts, params)]


@pytest.mark.parametrize("settings", [
    dict(num_kv_blocks=24, max_num_batched_tokens=33),  # preempts (recompute)
    dict(max_num_batched_tokens=7),  # chunked prefill
    dict(max_num_seqs=5),  # few sequences at a time
])
def test_batched_constrained_output_matches_alone(tiny_model_dir, alone, settings):
    llm = make_tiny_llm(tiny_model_dir, **settings)
    prompts, params = workload(24)
    outs = [o.outputs[0] for o in llm.generate(prompts, params)]
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    for o, p in zip(outs, params):
        if p.structured is not None:
            assert o.finish_reason == "stop" and re.fullmatch(REGEX, o.text), o.text
    if "num_kv_blocks" in settings:
        assert llm.engine.get_stats().num_preemptions > 0
    llm.engine.check_invariants()
    assert llm.engine.kv.usage == 0


def test_constraint_changes_what_the_model_says(tiny_model_dir, alone):
    """The reference is not vacuous: unconstrained, the random model leaves the regex."""
    llm = make_tiny_llm(tiny_model_dir)
    prompts, params = workload(24)
    free = llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=24))[0]
    assert not re.fullmatch(REGEX, free.outputs[0].text)
    assert re.fullmatch(REGEX, alone[0].text)

"""KV pool sizing on a GPU from the profiled peak of the largest step."""

from __future__ import annotations

import pytest
import torch

from peregrine.engine.memory_profile import (kv_budget_bytes, profile_forward,
                                             profile_lengths)
from tests.conftest import make_tiny_llm


def test_dummy_batch_covers_the_budget_in_prompts_no_longer_than_the_context():
    assert profile_lengths(8192, 4096) == [4096, 4096]
    assert profile_lengths(8192, 3000) == [3000, 3000, 2192]
    assert profile_lengths(100, 4096) == [100]


def test_budget_is_utilization_minus_peak_minus_foreign_memory():
    gib = 2**30
    assert kv_budget_bytes(80 * gib, 20 * gib, gib, 0.9) == pytest.approx(51 * gib)
    assert kv_budget_bytes(80 * gib, 80 * gib, 0, 0.9) < 0  # nothing left: the engine refuses


def test_profile_forward_runs_prompts_longer_than_the_context(tiny_model_dir):
    llm = make_tiny_llm(tiny_model_dir)
    model = llm.engine.loaded.model
    profile_forward(model, num_tokens=300, max_len=128, logit_rows=7,
                    device=torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_pool_fills_what_utilization_leaves(tiny_model_dir):
    llm = make_tiny_llm(tiny_model_dir, device="cuda", dtype="bfloat16", num_kv_blocks=None,
                        gpu_memory_utilization=0.5)
    free, total = torch.cuda.mem_get_info()
    # The pool took about half the device minus weights and activations; the rest is free.
    assert free > 0.4 * total
    pool = sum(c.k.numel() * c.k.element_size() * 2 for c in llm.engine.kv_caches)
    assert 0.3 * total < pool < 0.5 * total

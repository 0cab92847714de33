"""Mixtures of experts on two processes (gloo): tensor_parallel_size=2 with every expert
split by columns (the default) and with expert parallelism (whole experts per rank) gives
the greedy tokens of one process, for Mixtral, Qwen2-MoE (a shared expert, a dense layer)
and Qwen3-MoE, through chunked prefill, prefix caching and preemption, on exactly tied
router scores, with int8 / int4 experts, and split into pipeline stages.

The models are transformers' tiny random ones with routers and experts sharpened
(tests/models/parity.py: routing matters in the logits), run in float64, where the
all-reduce's summation order cannot flip a token (docs/distributed.md#exactness)."""

from __future__ import annotations

import os

import pytest
import torch

from peregrine import LLM
from tests.conftest import write_hf_checkpoint
from tests.distributed.conftest import greedy_tokens
from tests.distributed.test_tensor_parallel import ENGINE, workload
from tests.models.parity import sharpen_experts

CHECKPOINT_ENGINE = {k: v for k, v in ENGINE.items() if k != "load_format"}
# transformers' tiny configs with experts wide enough to split over two ranks
FAMILIES = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_hidden_layers=3, num_experts=6, num_experts_per_tok=2,
                      moe_intermediate_size=64, shared_expert_intermediate_size=96,
                      mlp_only_layers=[1], norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=64,
                      head_dim=32, norm_topk_prob=True),
}
SPLITS = {"experts-split": {}, "expert-parallel": {"enable_expert_parallel": True}}


def checkpoint(tmp_path_factory, family: str) -> str:
    """A sharpened tiny random checkpoint of `family`."""
    tmp = tmp_path_factory.mktemp(family)
    path, ref = write_hf_checkpoint(tmp, family, **FAMILIES[family])
    sharpen_experts(ref, path)
    return path


def assert_split_matches(path: str, prompts: list, max_tokens: int, splits: list[str],
                         preempts: bool = False, **opts) -> None:
    """Each split of `splits` on two ranks gives one process's greedy tokens (having
    preempted and hit the prefix cache on the way when `preempts`)."""
    engine = dict(CHECKPOINT_ENGINE, **opts)
    want = greedy_tokens(LLM(path, **engine), prompts, max_tokens)
    for split in splits:
        with LLM(path, tensor_parallel_size=2, **SPLITS[split], **engine) as two:
            assert greedy_tokens(two, prompts, max_tokens) == want, split
            stats = two.engine.get_stats()
            if preempts:
                assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
            two.engine.check_invariants()


def test_mixtral_matches_one_process_through_chunking_caching_and_preemption(
        tmp_path_factory):
    assert_split_matches(checkpoint(tmp_path_factory, "mixtral"), workload(), 16,
                         list(SPLITS), preempts=True)


@pytest.mark.parametrize("family,splits", [
    ("qwen2_moe", ["experts-split", "expert-parallel"]),
    ("qwen3_moe", ["expert-parallel"]),
    pytest.param("qwen3_moe", ["experts-split"], marks=pytest.mark.slow),
])
def test_qwen_moe_matches_one_process(tmp_path_factory, family, splits):
    """Qwen2-MoE's shared expert joins the routed experts' all-reduce; its middle layer is
    a dense MLP split as usual. Qwen3-MoE routes each token to 3 of 8 experts."""
    assert_split_matches(checkpoint(tmp_path_factory, family), workload()[:3], 12, splits)


def test_tied_router_scores_route_alike_on_every_rank(tmp_path_factory):
    """Layer 0's router rows all equal: its eight probabilities tie exactly for every token,
    and each rank's replicated router must pick the experts one process picks (under expert
    parallelism a disagreement would drop or double-count a (token, slot) pair)."""
    tmp = tmp_path_factory.mktemp("tied")
    _, ref = write_hf_checkpoint(tmp, "mixtral", **FAMILIES["mixtral"])
    with torch.no_grad():
        gate = ref.model.layers[0].mlp.gate.weight
        gate.copy_(gate[:1].expand_as(gate) * 20)
    path = os.path.join(tmp, "tied")
    sharpen_experts(ref, path, router=1.0)
    assert_split_matches(path, workload()[:3], 10, ["expert-parallel"])


@pytest.mark.parametrize("quant,splits", [
    ("int8", ["experts-split", "expert-parallel"]),
    ("int4", ["expert-parallel"]),
    pytest.param("int4", ["experts-split"], marks=pytest.mark.slow),
])
def test_quantized_experts_match_one_process(tmp_path_factory, quant, splits):
    """int8 (per channel) and int4 (group 32) experts, split in their packed form or kept
    whole: in float64 the kernels dequantize exactly, so the tokens are one process's (as
    for dense int4 in test_tensor_parallel.py)."""
    assert_split_matches(checkpoint(tmp_path_factory, "mixtral"), workload()[:3], 12, splits,
                         quantization=quant,
                         quantization_group_size=32 if quant == "int4" else None)


def test_pipeline_stages_of_a_moe_model_match_one_process(tmp_path_factory):
    """Qwen2-MoE's 3 layers (sparse, dense, sparse) in stages of 2 and 1."""
    path = checkpoint(tmp_path_factory, "qwen2_moe")
    prompts = workload()[:4]
    want = greedy_tokens(LLM(path, **CHECKPOINT_ENGINE), prompts, 12)
    with LLM(path, pipeline_parallel_size=2, **CHECKPOINT_ENGINE) as two:
        assert greedy_tokens(two, prompts, 12) == want


@pytest.mark.slow
def test_expert_parallel_with_pipeline_stages_matches_one_process(tmp_path_factory):
    """2 x 2 ranks: each stage's two ranks split its MoE layers by experts."""
    path = checkpoint(tmp_path_factory, "qwen2_moe")
    prompts = workload()[:4]
    want = greedy_tokens(LLM(path, **CHECKPOINT_ENGINE), prompts, 12)
    with LLM(path, tensor_parallel_size=2, pipeline_parallel_size=2,
             enable_expert_parallel=True, **CHECKPOINT_ENGINE) as four:
        assert greedy_tokens(four, prompts, 12) == want


def test_the_flag_reaches_the_config():
    import argparse

    from peregrine.cli import engine_config
    from peregrine.config import add_engine_args
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    ns = parser.parse_args(["--tensor-parallel-size", "2", "--enable-expert-parallel"])
    cfg = engine_config(ns)
    assert (cfg.tensor_parallel_size, cfg.enable_expert_parallel) == (2, True)
    assert not engine_config(parser.parse_args([])).enable_expert_parallel

"""How mixture-of-experts layers split over tensor-parallel ranks: which rank owns which
expert (uneven counts too), that sliced experts are exactly the slices of the whole, which
splits are refused, and that a sharded MoE model computes what the whole one does with one
all-reduce per MoE layer, for float and quantized experts, by columns and by experts
(ranks as threads with real gloo groups: no processes here)."""

from __future__ import annotations

import copy

import pytest
import torch

from peregrine.attention_backend import AttentionMetadata
from peregrine.distributed.layout import check_splittable, expert_span
from peregrine.distributed.sharding import shard_model
from peregrine.layers.moe import FusedExperts, QuantExperts
from peregrine.layers.parallel_moe import ParallelMoE, keep_experts, slice_expert_columns
from peregrine.models.config import ModelConfig
from peregrine.models.loader import load_model
from peregrine.quantization.apply import QuantSpec, quantize_model

from tests.conftest import tiny_config_dir
from tests.distributed.conftest import run_ranks

# Dummy-weight configs (float64): 6 heads over 3 KV heads split over 2 and 3 ranks alike.
HEADS = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, vocab_size=515)
MIXTRAL = dict(HEADS, architectures=["MixtralForCausalLM"], model_type="mixtral",
               num_local_experts=8, num_experts_per_tok=2, intermediate_size=192)
QWEN2_MOE = dict(HEADS, architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe",
                 num_hidden_layers=3, num_experts=6, num_experts_per_tok=2,
                 intermediate_size=192, moe_intermediate_size=96,
                 shared_expert_intermediate_size=128, mlp_only_layers=[1])


@pytest.mark.parametrize("experts,ranks,sizes", [
    (8, 2, [4, 4]), (8, 3, [2, 3, 3]), (6, 4, [1, 2, 1, 2]), (60, 8, [7, 8] * 4), (3, 3, [1] * 3),
])
def test_every_expert_has_exactly_one_owner_in_contiguous_runs(experts, ranks, sizes):
    spans = [expert_span(experts, ranks, r) for r in range(ranks)]
    assert [len(s) for s in spans] == sizes
    assert [e for s in spans for e in s] == list(range(experts))


def test_moe_splits_that_cannot_work_say_why():
    cfg = ModelConfig("mixtral", 256, 64, 128, 2, 4, 2, 16, num_experts=2,
                      num_experts_per_tok=1, moe_intermediate_size=128)
    check_splittable(cfg, 2, 1)  # no longer refused: experts split by columns
    with pytest.raises(ValueError, match="2 experts are fewer than tensor_parallel_size=4"):
        check_splittable(cfg, 4, 1, expert_parallel=True)
    narrow = ModelConfig("qwen3_moe", 256, 64, 128, 2, 4, 2, 16, num_experts=8,
                         num_experts_per_tok=2, moe_intermediate_size=32)
    with pytest.raises(ValueError, match="moe_intermediate_size 32 is too small"):
        check_splittable(narrow, 2, 1)
    check_splittable(narrow, 2, 1, expert_parallel=True)  # whole experts: width is no matter
    # no dense layer: intermediate_size (Mixtral's expert width) splits only as experts do
    mixtral = ModelConfig("mixtral", 256, 64, 32, 2, 4, 2, 16, num_experts=8,
                          num_experts_per_tok=2, moe_intermediate_size=32)
    check_splittable(mixtral, 2, 1, expert_parallel=True)
    with pytest.raises(ValueError, match="moe_intermediate_size 32 is too small"):
        check_splittable(mixtral, 2, 1)


def _experts(quant: str) -> FusedExperts | QuantExperts:
    torch.manual_seed(0)
    ex = FusedExperts(6, 64, 96)
    ex.gate_up_proj.data.normal_()
    ex.down_proj.data.normal_()
    if quant == "none":
        return ex
    holder = torch.nn.Module()
    holder.experts = ex
    return quantize_model(holder, QuantSpec(quant, group_size=32)).experts


def _expert_weights(ex: FusedExperts | QuantExperts, i: int) -> tuple[torch.Tensor, ...]:
    if isinstance(ex, FusedExperts):
        return ex.gate_up_proj.data[i], ex.down_proj.data[i]
    return ex.gate_up_proj[i].dequantize(), ex.down_proj[i].dequantize()


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_sliced_experts_are_exactly_the_slices_of_the_whole(quant):
    ex = _experts(quant)
    part = slice_expert_columns(ex, 32, 96, "mlp.experts")
    kept = keep_experts(ex, range(2, 5))
    assert (part.held, kept.held, kept.num_experts) == (range(6), range(2, 5), 6)
    for e in range(6):
        gate_up, down = _expert_weights(ex, e)
        p_gate_up, p_down = _expert_weights(part, e)
        assert torch.equal(p_gate_up, torch.cat([gate_up[32:96], gate_up[96 + 32:]]))
        assert torch.equal(p_down, down[:, 32:96])
    for i, e in enumerate(range(2, 5)):
        assert all(torch.equal(a, b) for a, b in zip(_expert_weights(kept, i),
                                                      _expert_weights(ex, e)))


def test_held_experts_add_up_to_the_whole_block():
    """Each rank's experts computed apart and summed give the whole block's output, for a
    batch and for one decoding token (the ungrouped path), including a rank that receives
    no token at all."""
    ex = _experts("none").double()
    x = torch.randn(5, 64, dtype=torch.float64)
    weights = torch.rand(5, 2, dtype=torch.float64)
    ids = torch.tensor([[0, 1], [1, 0], [4, 0], [1, 4], [0, 4]])  # nothing for 2, 3, 5
    for rows in (slice(None), slice(0, 1)):
        want = ex(x[rows], weights[rows], ids[rows])
        parts = [keep_experts(ex, expert_span(6, 3, r))(x[rows], weights[rows], ids[rows])
                 for r in range(3)]
        assert torch.count_nonzero(parts[1]) == 0
        torch.testing.assert_close(sum(parts), want, rtol=0, atol=1e-12)


def _logits_on_ranks(path: str, tp: int, expert_parallel: bool, quant: str = "none"
                     ) -> None:
    model = load_model(path, load_format="dummy", dtype=torch.float64, seed=3,
                       quantization=quant,
                       quant_group_size=32 if quant == "int4" else None).model
    ids = torch.tensor([1, 77, 300, 514, 2, 9, 400, 3, 5])
    positions = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0])
    meta = AttentionMetadata.prefill_only([8, 1])
    with torch.inference_mode():
        want = model.compute_logits(model(ids, positions, meta))

    def rank(layout, groups):
        from dataclasses import replace
        layout = replace(layout, expert_parallel=expert_parallel)
        net = copy.deepcopy(model)
        shard_model(net, layout, groups)
        calls = groups.comm_calls
        with torch.inference_mode():
            hidden = net(ids, positions, meta)
        calls = groups.comm_calls - calls
        with torch.inference_mode():
            logits = net.compute_logits(hidden)
        moe = [layer.mlp for layer in net.layers if isinstance(layer.mlp, ParallelMoE)]
        return logits, moe, calls

    results = run_ranks(tp, 1, rank)
    logits, moe, calls = results[0]
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-10)
    cfg = model.config
    sparse = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    assert len(moe) == sparse > 0
    # embedding + per layer: o_proj and the MLP's one (a sparse block's included)
    assert calls == 1 + 2 * cfg.num_layers
    held = [[r[1][0].moe.experts.held for r in results]]
    if expert_parallel:
        assert held == [[expert_span(cfg.num_experts, tp, r) for r in range(tp)]]
    else:
        assert held == [[range(cfg.num_experts)] * tp]


@pytest.mark.parametrize("split", ["experts-split", "expert-parallel"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_a_split_moe_model_computes_what_the_whole_one_does(tmp_path_factory, family, split):
    path = tiny_config_dir(tmp_path_factory, **(MIXTRAL if family == "mixtral" else QWEN2_MOE))
    _logits_on_ranks(path, 2, split == "expert-parallel")


def test_uneven_expert_parallelism_on_three_ranks(tmp_path_factory):
    """8 experts on 3 ranks (2, 3, 3); attention splits its 3 KV heads one a rank."""
    path = tiny_config_dir(tmp_path_factory, **MIXTRAL)
    _logits_on_ranks(path, 3, True)


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("split", ["experts-split", "expert-parallel"])
def test_quantized_experts_split_in_their_packed_form(tmp_path_factory, quant, split):
    path = tiny_config_dir(tmp_path_factory, **QWEN2_MOE)
    _logits_on_ranks(path, 2, split == "expert-parallel", quant)

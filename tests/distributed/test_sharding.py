"""How a model is split: which heads, columns and layers each rank keeps, that sliced
weights (float and every quantized format) are exactly the slices of the whole, that
impossible splits say what would work, and that a sharded model computes what the whole
one does (ranks as threads with real gloo groups: no processes here)."""

from __future__ import annotations

import copy

import pytest
import torch

from peregrine.attention_backend import AttentionMetadata
from peregrine.distributed.layout import (ParallelLayout, attention_heads, balanced_span,
                                          check_splittable)
from peregrine.distributed.pipeline import reads_ahead, split_microbatches
from peregrine.distributed.sharding import shard_model
from peregrine.layers.linear import FP8Linear, Int4Linear, Int8Linear, Linear, NF4Linear
from peregrine.layers.parallel_linear import slice_columns, slice_rows
from peregrine.models.loader import load_model

from tests.conftest import tiny_config_dir
from tests.distributed.conftest import run_ranks


@pytest.mark.parametrize("heads,kv_heads,tp", [
    (4, 2, 2), (9, 3, 2),  # SmolLM2-135M: 3 GQA groups on 2 ranks, 2 + 1
    (8, 8, 4), (32, 8, 4), (8, 1, 2),  # one KV head on two ranks: replicated
    (8, 2, 4), (6, 2, 4),  # each KV head on two ranks, its 3 query heads split 2 + 1
])
def test_every_query_head_lands_on_one_rank_with_the_kv_head_it_reads(heads, kv_heads, tp):
    group = heads // kv_heads
    seen = []
    for rank in range(tp):
        q0, nq, kv0, nkv = attention_heads(heads, kv_heads, tp, rank)
        assert nq >= 1 and nkv >= 1 and nq % nkv == 0  # uniform GQA on every rank
        local_group = nq // nkv
        for i in range(nq):  # the local grouping reads the right KV head
            assert kv0 + i // local_group == (q0 + i) // group
        seen.extend(range(q0, q0 + nq))
    assert seen == list(range(heads))


@pytest.mark.parametrize("heads,kv_heads,tp,why", [
    (9, 3, 4, "neither split over nor replicate"),
    (4, 1, 8, "fewer than"),
])
def test_impossible_head_splits_say_why(heads, kv_heads, tp, why):
    with pytest.raises(ValueError, match=why):
        attention_heads(heads, kv_heads, tp, 0)


def test_stages_take_contiguous_layers_earlier_ones_the_remainder():
    layout = ParallelLayout(1, 4)
    spans = [layout.stage_layers(30, s) for s in range(4)]
    assert [len(s) for s in spans] == [8, 8, 7, 7]
    assert [i for s in spans for i in s] == list(range(30))


def test_ranks_are_stage_major():
    layouts = [ParallelLayout(2, 2, r) for r in range(4)]
    assert [(l.stage, l.tp_rank) for l in layouts] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert layouts[3].peer(0) == 1 and layouts[0].last_stage_leader == 2


def test_balanced_spans_fall_on_whole_units():
    assert [balanced_span(1536, 2, r, 128) for r in range(2)] == [(0, 768), (768, 1536)]
    assert [balanced_span(576, 2, r, 128) for r in range(2)] == [(0, 384), (384, 576)]
    assert [balanced_span(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]


def test_pipeline_splits_of_gemma_and_too_many_stages_are_refused():
    from peregrine.models.config import ModelConfig
    gemma = ModelConfig("gemma2", 256, 64, 128, 2, 4, 2, 16)
    with pytest.raises(ValueError, match="Gemma"):
        check_splittable(gemma, 1, 2)
    with pytest.raises(ValueError, match="more stages"):
        check_splittable(ModelConfig("llama", 256, 64, 128, 2, 4, 2, 16), 1, 3)


def test_micro_batches_balance_tokens_and_keep_every_sequence_whole():
    assert split_microbatches(list(range(9)), 2) == [0, 4, 8]  # 8 decodes: 4 + 4
    assert split_microbatches([0, 1], 2) == [0, 1]  # one sequence cannot be split
    assert split_microbatches([0, 1, 2, 100], 2) == [0, 2, 3]
    bounds = split_microbatches([0, 5, 9, 30, 31, 60], 3)
    assert bounds[0] == 0 and bounds[-1] == 5 and len(bounds) == 4
    assert all(a < b for a, b in zip(bounds, bounds[1:]))


def test_a_micro_batch_reading_a_block_a_later_one_writes_keeps_the_step_whole():
    bs = 4
    # sequence 0 (a prefix-cache hit) reads block 7, which sequence 1 fills in this step
    table = torch.tensor([[7, 3], [7, 0]], dtype=torch.int32)
    slots = torch.tensor([3 * bs + 1] + [7 * bs + i for i in range(4)])
    meta = AttentionMetadata.build([0, 1, 5], [6, 4], 1, slots, table)
    assert reads_ahead([0, 1, 2], meta, bs)
    # the other way round (a later micro-batch reads what an earlier one wrote) is safe
    meta = AttentionMetadata.build([0, 4, 5], [4, 6], 0,
                                   torch.tensor([7 * bs + i for i in range(4)] + [3 * bs + 1]),
                                   torch.tensor([[7, 0], [7, 3]], dtype=torch.int32))
    assert not reads_ahead([0, 1, 2], meta, bs)


def _formats(w: torch.Tensor) -> dict[str, torch.nn.Module]:
    lin = Linear(w.shape[1], w.shape[0], bias=True)
    lin.weight.data.copy_(w)
    lin.bias.data.normal_()
    return {"float": lin, "int8": Int8Linear.from_float(w), "int8-g32": Int8Linear.from_float(
        w, None, 32), "int4-g32": Int4Linear.from_float(w, None, 32), "int4-g64-sym":
        Int4Linear.from_float(w, None, 64, symmetric=True), "nf4": NF4Linear.from_float(w),
        "fp8": FP8Linear.from_float(w)}


def _weight(lin: torch.nn.Module) -> torch.Tensor:
    return lin.weight.data if isinstance(lin, Linear) else lin.dequantize()


@pytest.mark.parametrize("fmt", ["float", "int8", "int8-g32", "int4-g32", "int4-g64-sym",
                                 "nf4", "fp8"])
def test_sliced_weights_are_exactly_the_slices_of_the_whole(fmt):
    torch.manual_seed(0)
    lin = _formats(torch.randn(96, 256) * 0.05)[fmt]
    full = _weight(lin)
    rows = torch.cat([torch.arange(10, 30), torch.arange(64, 70)])
    part = slice_rows(lin, rows)
    assert torch.equal(_weight(part), full[rows])
    assert torch.equal(part.bias.data, lin.bias.data[rows]) if lin.bias is not None else True
    for start, end in [(0, 128), (128, 256), (64, 192)]:
        cols = slice_columns(lin, start, end)
        assert cols.bias is None  # a row-parallel layer adds it once, after the all-reduce
        assert torch.equal(_weight(cols), full[:, start:end])


def test_a_split_through_quantization_groups_names_the_group_sizes_that_fit():
    lin = Int4Linear.from_float(torch.randn(64, 576), None, 128)
    with pytest.raises(ValueError, match=r"288 input columns per rank cut its quantization "
                                         r"groups of 128 weights.*\[32\]"):
        slice_columns(lin, 0, 288)
    slice_columns(lin, 384, 576)  # the last group of the row may be short


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny random Llama (float64, GQA with 2 KV heads) and the same with int4 weights."""
    path = tiny_config_dir(tmp_path_factory, num_hidden_layers=3, vocab_size=515)
    return {q: load_model(path, load_format="dummy", dtype=torch.float64, seed=3,
                          quantization=q, quant_group_size=32 if q == "int4" else None).model
            for q in ("none", "int4")}


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_a_tensor_parallel_model_computes_what_the_whole_one_does(tiny_models, quant):
    """Logits of two ranks (threads) against one model: the same up to float64 rounding;
    the odd vocabulary (515) leaves the last rank's slice of the LM head short."""
    model = tiny_models[quant]
    ids = torch.tensor([1, 77, 300, 514, 2, 9, 400, 3])
    positions = torch.arange(len(ids))
    meta = AttentionMetadata.prefill_only([len(ids)])
    with torch.inference_mode():
        want = model.compute_logits(model(ids, positions, meta))

    def rank(layout, groups):
        net = copy.deepcopy(model)
        kv = shard_model(net, layout, groups)
        with torch.inference_mode():
            logits = net.compute_logits(net(ids, positions, meta))
        return logits, kv

    (logits, kv), (_, kv1) = run_ranks(2, 1, rank)
    assert logits.shape == want.shape
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-10)
    assert (kv.num_kv_heads, kv1.num_kv_heads, kv.num_heads) == (1, 1, 2)


def test_pipeline_stages_hand_over_the_residual_stream_without_changing_a_bit(tiny_models):
    """Two stages (threads) through the StageRunner: the driver's hidden states are
    bit-identical to one model's; cut into micro-batches, equal up to the rounding of
    smaller matrix products."""
    from peregrine.distributed.stage import StageRunner
    model = tiny_models["none"]
    ids = torch.tensor([5, 6, 7, 8, 9, 10, 11])
    positions = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    meta = AttentionMetadata.prefill_only([4, 3])
    with torch.inference_mode():
        want = model(ids, positions, meta)

    def rank(layout, groups):
        net = copy.deepcopy(model)
        shard_model(net, layout, groups)
        stage = StageRunner(net, [], layout, groups, torch.device("cpu"))
        return stage.forward(ids, positions, meta, [0, 2]), stage.forward(ids, positions, meta,
                                                                          [0, 1, 2])

    (whole, micro), nothing = run_ranks(1, 2, rank)
    assert nothing == (None, None)
    assert torch.equal(whole, want)
    torch.testing.assert_close(micro, want, rtol=0, atol=1e-12)

"""CUDA-graph batch ladder and padding; replay equals eager where a GPU is present."""

from __future__ import annotations

import pytest
import torch

from peregrine import SamplingParams
from peregrine.attention_backend import AttentionMetadata
from peregrine.engine.cuda_graphs import DecodeBuffers, capture_sizes, padded_size
from tests.conftest import make_tiny_llm


def test_ladder_is_1_2_4_then_multiples_of_8_up_to_max_num_seqs():
    assert capture_sizes(128) == [1, 2, 4] + list(range(8, 129, 8))
    assert capture_sizes(100)[-3:] == [88, 96, 100]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(1) == [1]


@pytest.mark.parametrize("n,expected", [(1, 1), (3, 4), (4, 4), (5, 8), (17, 24), (100, 100),
                                        (101, None)])
def test_batch_pads_to_the_next_captured_size(n, expected):
    assert padded_size(n, capture_sizes(100)) == expected


def test_buffers_hold_the_batch_then_inert_padding():
    buf = DecodeBuffers.allocate(8, max_blocks=6, device=torch.device("cpu"))
    buf.block_tables.fill_(99)  # stale entries of an earlier, longer batch
    meta = AttentionMetadata(query_start_loc=[0, 1, 2, 3], seq_lens=[9, 4, 17], num_decodes=3,
                             slot_mapping=torch.tensor([32, 13, 70]),
                             block_tables=torch.tensor([[8, 2, 0], [3, 0, 0], [1, 5, 17]],
                                                       dtype=torch.int32),
                             seq_lens_t=torch.tensor([9, 4, 17], dtype=torch.int32))
    buf.load(torch.tensor([5, 6, 7]), torch.tensor([8, 3, 16]), meta, size=4)
    assert buf.input_ids[:4].tolist() == [5, 6, 7, 0]
    assert buf.positions[:4].tolist() == [8, 3, 16, 0]
    assert buf.slot_mapping[:4].tolist() == [32, 13, 70, -1]  # padding writes no KV
    assert buf.seq_lens[:4].tolist() == [9, 4, 17, 0]  # ... and attends to nothing
    assert buf.block_tables[:3, :3].tolist() == meta.block_tables.tolist()
    assert buf.block_tables[3].tolist() == [0] * 6
    graph_meta = buf.metadata(4, max_seq_len=1024)
    assert graph_meta.num_decodes == graph_meta.num_seqs == graph_meta.num_tokens == 4
    assert graph_meta.seq_lens == [1024] * 4  # sizes launches for the longest context
    assert graph_meta.query_start_loc_t.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_replay_matches_eager_greedy(tiny_model_dir):
    prompts = [{"prompt_token_ids": list(range(i, i + 5 + 3 * i))} for i in range(11)]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = {}
    for eager in (True, False):
        llm = make_tiny_llm(tiny_model_dir, device="cuda", dtype="float32", enforce_eager=eager,
                            max_num_seqs=16)
        assert (llm.engine.runner.graphs is None) == eager
        outs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    assert outs[True] == outs[False]

"""The K-quant writer: its blocks decode (by the gguf package) to the weights they were made
from, within each type's rounding, and its recipes give tensors llama.cpp's types."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants

from peregrine.models.gguf_file import QT, GGUFFile
from peregrine.quantization.kquants import quantize_tensor, recipe_type

# mean |error| / mean |w| of round-to-nearest on Gaussian weights: 4, 5 and 6 bits
BOUNDS = {QT.Q4_K: 0.10, QT.Q5_K: 0.05, QT.Q6_K: 0.025}


@pytest.mark.parametrize("qtype", list(BOUNDS), ids=lambda t: t.name)
def test_k_quant_blocks_decode_to_the_weights(qtype):
    w = torch.randn(8, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    raw, used = quantize_tensor(w, qtype)
    assert used == qtype and raw.dtype == np.uint8
    back = torch.from_numpy(quants.dequantize(raw.reshape(-1), qtype).reshape(8, 512))
    assert float((back - w).abs().mean() / w.abs().mean()) < BOUNDS[qtype]


def test_rows_not_a_multiple_of_256_fall_back_as_llama_cpp_does():
    w = torch.randn(4, 576)
    assert quantize_tensor(w, QT.Q4_K)[1] == QT.Q5_0
    assert quantize_tensor(w, QT.Q5_K)[1] == QT.Q5_1
    assert quantize_tensor(w, QT.Q6_K)[1] == QT.Q8_0


def test_q4_k_m_gives_more_bits_to_attn_v_and_ffn_down_of_some_layers():
    more = [i for i in range(30) if recipe_type(f"blk.{i}.ffn_down.weight", "Q4_K_M", 30)
            == QT.Q6_K]
    # llama.cpp's use_more_bits: the first and last eighth (3 of 30), every third between
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert recipe_type("blk.4.ffn_down.weight", "Q4_K_M", 30) == QT.Q4_K
    assert recipe_type("blk.4.attn_q.weight", "Q4_K_M", 30) == QT.Q4_K
    assert recipe_type("token_embd.weight", "Q4_K_M", 30) == QT.Q6_K
    assert recipe_type("blk.4.attn_q.weight", "Q6_K", 30) == QT.Q6_K
    with pytest.raises(ValueError, match="recipe"):
        recipe_type("blk.0.attn_q.weight", "Q3_K_S", 30)


def test_a_written_file_keeps_the_source_metadata(smollm2_path, smollm2_q4_k_m_path):
    src, dst = GGUFFile(smollm2_path), GGUFFile(smollm2_q4_k_m_path)
    assert dst.metadata["tokenizer.ggml.tokens"] == src.metadata["tokenizer.ggml.tokens"]
    assert dst.metadata["llama.block_count"] == 30
    assert set(dst.tensors) == set(src.tensors)
    assert dst.tensors["blk.0.ffn_down.weight"].qtype == QT.Q6_K
    assert dst.tensors["blk.4.ffn_down.weight"].qtype == QT.Q4_K
    assert dst.tensors["blk.4.attn_q.weight"].qtype == QT.Q5_0  # 576 wide: falls back

"""The K-quant writer: its blocks decode (by the gguf package) to exactly the values it
meant, within each type's rounding of the weights; its scale search never does worse than
round-to-nearest; its recipes give tensors llama.cpp's types."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants

from peregrine.models.gguf_file import QT, GGUFFile
from peregrine.quantization.kquants import (importance_from_calibration, intended_values,
                                             quantize_tensor, recipe_type)

# mean |error| / mean |w| of round-to-nearest on Gaussian weights: 4, 5, 6 and 8 bits
BOUNDS = {QT.Q4_K: 0.10, QT.Q5_K: 0.05, QT.Q6_K: 0.025, QT.Q5_0: 0.05, QT.Q8_0: 0.008}


def gaussian(rows: int = 16, cols: int = 512) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.05


def on_a_q4_1_grid(w: torch.Tensor) -> torch.Tensor:
    """w moved to 16 equally spaced levels per 32 (as SmolLM2's dequantized Q4_1 weights are)."""
    x = w.reshape(-1, 32)
    lo = x.amin(-1, keepdim=True)
    d = (x.amax(-1, keepdim=True) - lo) / 15
    return (lo + d * torch.round((x - lo) / d)).reshape(w.shape)


def decoded(w: torch.Tensor, qtype: QT, **kw) -> torch.Tensor:
    raw, used = quantize_tensor(w, qtype, **kw)
    assert used == qtype and raw.dtype == np.uint8
    return torch.from_numpy(quants.dequantize(raw.reshape(-1), qtype).reshape(w.shape))


@pytest.mark.parametrize("qtype", list(BOUNDS), ids=lambda t: t.name)
def test_blocks_decode_to_the_weights(qtype):
    w = gaussian()
    back = decoded(w, qtype)
    assert float((back - w).abs().mean() / w.abs().mean()) < BOUNDS[qtype]


@pytest.mark.parametrize("search", [True, False], ids=["searched", "rtn"])
@pytest.mark.parametrize("qtype", list(BOUNDS), ids=lambda t: t.name)
def test_the_gguf_package_decodes_the_values_the_writer_meant(qtype, search):
    w = gaussian(8)
    imp = torch.rand(512, generator=torch.Generator().manual_seed(1))
    assert torch.equal(decoded(w, qtype, search=search), intended_values(w, qtype, search=search))
    assert torch.equal(decoded(w, qtype, importance=imp), intended_values(w, qtype, imp))


@pytest.mark.parametrize("weights", [gaussian, lambda: on_a_q4_1_grid(gaussian())],
                         ids=["gaussian", "q4_1-grid"])
@pytest.mark.parametrize("qtype", list(BOUNDS), ids=lambda t: t.name)
def test_the_scale_search_never_does_worse_than_round_to_nearest(qtype, weights):
    w = weights()
    searched = (decoded(w, qtype) - w).square().reshape(-1, 256).sum(-1)
    rtn = (decoded(w, qtype, search=False) - w).square().reshape(-1, 256).sum(-1)
    assert bool((searched <= rtn).all())  # per 256 weights: every block keeps RTN's candidate
    assert float(searched.sum()) < 0.95 * float(rtn.sum())


@pytest.mark.parametrize("qtype", [QT.Q5_0, QT.Q8_0], ids=lambda t: t.name)
def test_round_to_nearest_is_no_worse_than_the_gguf_packages_quantizer(qtype):
    w = gaussian()
    theirs = quants.dequantize(quants.quantize(w.numpy(), qtype).reshape(-1), qtype)
    err = (decoded(w, qtype, search=False) - w).square().sum()
    # the same levels, except where the float16 rounding of d moves one: never worse
    assert float(err) <= float(((torch.from_numpy(theirs).reshape(w.shape) - w) ** 2).sum())


@pytest.mark.parametrize("qtype", list(BOUNDS), ids=lambda t: t.name)
def test_blocks_of_zeros_decode_to_zeros(qtype):
    w = torch.zeros(2, 512)
    w[1, :256] = gaussian(1, 256)
    back = decoded(w, qtype, importance=torch.rand(512))
    assert not bool(back.isnan().any())
    assert bool((back[0] == 0).all()) and bool((back[1, 256:] == 0).all())


def test_importance_lowers_the_error_of_the_weighted_columns():
    w = gaussian()
    imp = torch.ones(512)
    imp[::32] = 100.0  # one column of every 32 matters
    for qtype in (QT.Q4_K, QT.Q6_K, QT.Q5_0):
        plain = (decoded(w, qtype) - w)[:, ::32].square().sum()
        weighted = (decoded(w, qtype, importance=imp) - w)[:, ::32].square().sum()
        assert float(weighted) < 0.8 * float(plain), qtype.name


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


def test_the_importance_is_the_mean_square_of_each_matrixs_input_columns(smollm2_path):
    imp = importance_from_calibration(smollm2_path, max_tokens=48, context=16)
    assert set(GGUFFile(smollm2_path).tensors) - set(imp) == {
        n for n, t in GGUFFile(smollm2_path).tensors.items() if len(t.shape) < 2}
    assert imp["blk.0.attn_q.weight"].shape == (576,)
    assert imp["blk.0.ffn_down.weight"].shape == (1536,)
    # q, k and v read the same normed hidden state; every column's mean square is positive
    assert torch.equal(imp["blk.3.attn_q.weight"], imp["blk.3.attn_v.weight"])
    assert all(bool((v > 0).all()) for v in imp.values())

"""A GGUF file's blocks repacked into our layouts hold the file's weights: Q8_0/Q4_1 exactly,
K-quant mixes (Q4_K_M) to float rounding, served through the fused step."""

from __future__ import annotations

import pytest
import torch

from peregrine.layers.linear import Int4Linear, Int5Linear, Int6Linear, Int8Linear
from peregrine.models.loader import gguf_config, load_model
from peregrine.models.gguf_file import GGUFFile
from peregrine.models.gguf_native import gguf_quantized_linears


@pytest.fixture(scope="module")
def float_model(smollm2_path):
    return load_model(smollm2_path).model


def test_repacked_blocks_equal_the_float_loader(smollm2_path, float_model):
    f = GGUFFile(smollm2_path)
    mods = gguf_quantized_linears(f, gguf_config(f))
    assert len(mods) == 30 * 4 + 1
    ref = dict(float_model.named_modules())
    for name in ("layers.0.self_attn.qkv_proj", "layers.7.mlp.gate_up_proj",
                 "layers.29.mlp.down_proj", "layers.3.self_attn.o_proj", "lm_head"):
        q = mods[name]
        assert isinstance(q, Int8Linear if name == "lm_head" else Int4Linear)  # Q8_0 / Q4_1
        assert q.group_size == 32
        # Q/K rows un-permuted and q/k/v, gate/up fused exactly as the float loader does
        assert torch.equal(q.dequantize(), ref[name].weight.float()), name


def test_gguf_quantization_keeps_greedy_sane(smollm2_path):
    from peregrine import LLM, SamplingParams
    llm = LLM(quantization="gguf", kv_cache_memory=0.05)
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))
    assert "Paris" in out[0].outputs[0].text
    # "What is the capital of France?" is a near-tie for this file's first answer token in
    # the float model itself ("The" -1.88 vs "L" -1.96 logprob), and llama.cpp on the same
    # file answers "L'Étoile..." too: a question with a clear answer checks the chat path.
    out = llm.chat([{"role": "user", "content": "Name the capital city of France."}],
                   SamplingParams(temperature=0, max_tokens=16))[0]
    assert "Paris" in out.outputs[0].text


def test_gguf_quantization_needs_a_gguf_file(tiny_model_dir):
    from peregrine.models.errors import ModelLoadError
    with pytest.raises(ModelLoadError, match="GGUF"):
        load_model(tiny_model_dir, load_format="dummy", quantization="gguf")


def test_a_q4_k_m_file_is_kept_in_its_blocks(smollm2_q4_k_m_path):
    f = GGUFFile(smollm2_q4_k_m_path)
    types = {t.qtype.name for t in f.tensors.values()}
    assert {"Q4_K", "Q5_0", "Q6_K", "Q8_0"} <= types  # the recipe's mix, rows of 576 fall back
    cfg = gguf_config(f)
    mods = gguf_quantized_linears(f, cfg)
    assert len(mods) == 30 * 4 + 1
    # layer 0 is one of the recipe's "more bits" layers: attn_v and ffn_down in Q6_K
    assert isinstance(mods["layers.0.mlp.down_proj"], Int6Linear)  # Q6_K: 6 bits, groups of 16
    assert mods["layers.0.mlp.down_proj"].group_size == 16
    assert isinstance(mods["layers.4.mlp.down_proj"], Int4Linear)  # Q4_K
    down = mods["layers.4.mlp.down_proj"]  # d * sc is not f16-exact: kept as stored
    assert down.scale.dtype == torch.int8 and down.scale_super.dtype == torch.float32
    assert down.weight_bytes() * 8 / (576 * 1536) == 4.75  # the file's 4.5 + float32 d, dmin
    six = mods["layers.0.mlp.down_proj"]  # Q6_K's offsets are -32 * scale: the same integers
    assert six.offset is six.scale and six.weight_bytes() * 8 / (576 * 1536) == 8.75
    assert isinstance(mods["layers.4.mlp.gate_up_proj"], Int5Linear)  # Q5_0 (K = 576), as stored
    assert mods["layers.4.mlp.gate_up_proj"].scale.dtype == torch.float16  # d, -16 d: exact
    assert isinstance(mods["layers.0.self_attn.qkv_proj"], Int8Linear)  # Q5_0 q/k + Q8_0 v
    floats = dict(load_model(smollm2_q4_k_m_path, quantization="none").model.named_modules())
    for name in ("layers.0.self_attn.qkv_proj", "layers.0.mlp.down_proj",
                 "layers.4.mlp.down_proj", "layers.4.mlp.gate_up_proj", "lm_head"):
        # the same weights as the float loader's, up to float rounding of the shifted grids
        torch.testing.assert_close(mods[name].dequantize(), floats[name].weight.float(),
                                   rtol=1e-6, atol=1e-7, msg=name)


def test_k_quant_scales_kept_as_stored_compute_the_bits_of_their_float32_products(
        smollm2_q4_k_m_path):
    f = GGUFFile(smollm2_q4_k_m_path)
    mods = gguf_quantized_linears(f, gguf_config(f))
    compact = {n: m for n, m in mods.items() if getattr(m, "scale_super", None) is not None}
    assert {type(m).__name__ for m in compact.values()} == {"Int4Linear", "Int6Linear"}
    x = torch.randn(3, 1536, generator=torch.Generator().manual_seed(0))
    for name, m in list(compact.items())[:6]:
        wide = m.plain()
        assert wide.scale.dtype == torch.float32 and wide.weight_bytes() > m.weight_bytes()
        assert torch.equal(m.dequantize(), wide.dequantize()), name
        for rows in (x[:1], x):  # the one-row kernel and the batch tile
            assert torch.equal(m(rows), wide(rows)), name


def test_tensors_kept_in_blocks_are_neither_dequantized_nor_written(smollm2_q4_k_m_path):
    """The float parameters of linears kept in their blocks are replaced after loading:
    loading leaves them unwritten (pages never touched are never resident), so a file's
    load does not first build the float model."""
    from peregrine.models.loader import _kept_in_blocks, gguf_tensors, load_weights
    from peregrine.models.loader import _materialize, model_class
    f = GGUFFile(smollm2_q4_k_m_path)
    cfg = gguf_config(f)
    kept = _kept_in_blocks(gguf_quantized_linears(f, cfg), f, cfg)
    assert "blk.3.ffn_down.weight" in kept and "token_embd.weight" not in kept  # tied
    sources = dict(gguf_tensors(f, cfg, kept))
    assert sources["model.layers.3.mlp.down_proj.weight"]() is None
    with torch.device("meta"):
        net = model_class(cfg)(cfg, max_positions=64)
    net = _materialize(net, torch.device("cpu"), torch.float32, cfg)
    for p in net.parameters():
        p.data.fill_(7.0)
    load_weights(net, gguf_tensors(f, cfg, kept))  # every slot counts as filled
    assert (net.layers[3].mlp.down_proj.weight == 7.0).all()  # not written
    assert (net.layers[3].input_layernorm.weight != 7.0).any()  # what is not kept is loaded


def test_a_q4_k_m_file_serves_through_the_fused_step(smollm2_q4_k_m_path):
    from peregrine import LLM, SamplingParams
    llm = LLM(model=smollm2_q4_k_m_path, kv_cache_memory=0.05)
    assert llm.engine.runner.fused is not None
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))
    assert "Paris" in out[0].outputs[0].text

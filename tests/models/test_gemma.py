"""Gemma 2 and Gemma 3 (text) equal transformers: scaled embedding, (1 + w) norms, four
norms per layer, GeGLU, local/global layers with a prompt longer than the window, Gemma 2's
soft-capping and Gemma 3's q/k norms and local RoPE base."""

from __future__ import annotations

import pytest
import torch

from peregrine.attention_backend import resolve_attention_backend
from peregrine.models.loader import load_model
from tests.conftest import write_hf_checkpoint
from tests.models.parity import (assert_greedy_matches, assert_logits_match, random_prompts,
                                 sharpen_attention)

# Small heads, a window of 8 so the prompts below cross it, a scale that is not head_dim's.
TINY = dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8)
CASES = {
    "gemma2": ("gemma2", dict(num_hidden_layers=3, **TINY)),
    # soft caps low enough to bend the logits of random weights
    "gemma2-low-caps": ("gemma2", dict(attn_logit_softcapping=0.5,
                                       final_logit_softcapping=0.3, **TINY)),
    "gemma3": ("gemma3", dict(num_hidden_layers=4, sliding_window_pattern=2,
                              rope_theta=1000000.0, **TINY)),
    "gemma3-linear-rope": ("gemma3", dict(
        num_hidden_layers=3, layer_types=["sliding_attention", "full_attention",
                                          "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                            "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        **TINY)),
}


def checkpoint(tmp_path, case: str) -> tuple[str, torch.nn.Module]:
    """The tiny random checkpoint of `case` and its transformers model."""
    family, overrides = CASES[case]
    path, ref = write_hf_checkpoint(tmp_path, family, **overrides)
    if case == "gemma2-low-caps":  # scores of random weights are too small to reach a cap
        sharpen_attention(ref, path)
    return path, ref


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    path, ref = checkpoint(tmp_path, case)
    # two sequences in one flat batch, the second three windows long
    assert_logits_match(path, ref, random_prompts([6, 27]))


@pytest.mark.parametrize("case", ["gemma2-low-caps", "gemma3"])
def test_greedy_alone_batched_and_chunked_match_transformers(tmp_path, case):
    path, ref = checkpoint(tmp_path, case)
    assert_greedy_matches(path, ref)


def test_layer_kinds_and_param_count(tmp_path):
    path, ref = write_hf_checkpoint(tmp_path, "gemma3", **CASES["gemma3"][1])
    loaded = load_model(path)
    cfg, net = loaded.config, loaded.model
    assert cfg.sliding_window is None  # global layers: the KV cache frees nothing
    assert [layer.self_attn.sliding_window for layer in net.layers] == [8, None, 8, None]
    assert [layer.is_local for layer in net.layers] == [True, False, True, False]
    assert net.rotary_local is not None and cfg.rope_local_theta == 10000.0
    assert cfg.num_params() == sum(p.numel() for p in ref.parameters())
    path, ref = write_hf_checkpoint(tmp_path, "gemma2", **CASES["gemma2"][1])
    cfg = load_model(path).config
    assert cfg.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (50.0, 30.0)
    assert cfg.num_params() == sum(p.numel() for p in ref.parameters())


def test_old_style_configs_give_the_layer_pattern():
    """Configs written before `layer_types`: Gemma 2 alternates from a local layer 0,
    Gemma 3 makes every sliding_window_pattern-th layer global."""
    from peregrine.models.config import ModelConfig
    base = dict(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=6,
                num_attention_heads=2, sliding_window=4)
    g2 = ModelConfig.from_hf({**base, "architectures": ["Gemma2ForCausalLM"]})
    assert [g2.layer_window(i) for i in range(6)] == [4, None, 4, None, 4, None]
    g3 = ModelConfig.from_hf({**base, "model_type": "gemma3_text", "sliding_window_pattern": 3,
                              "rope_local_base_freq": 10000, "rope_theta": 1000000,
                              "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert [g3.layer_window(i) for i in range(6)] == [4, 4, None, 4, 4, None]
    assert (g3.rope_theta, g3.rope_local_theta, g3.rope_scaling["factor"]) == (1e6, 1e4, 8.0)


def test_backends_for_soft_capping(tmp_path, monkeypatch):
    """Both backends soft-cap: Gemma 2 gets triton on CUDA like every model; a backend that
    could not would be refused by name."""
    from peregrine.kernels.triton_attention import TritonAttentionBackend
    path, _ = write_hf_checkpoint(tmp_path, "gemma2", **CASES["gemma2"][1])
    cfg = load_model(path).config
    cuda = torch.device("cuda")
    assert resolve_attention_backend("auto", cuda, cfg) == "triton"
    assert resolve_attention_backend("auto", torch.device("cpu"), cfg) == "torch"
    monkeypatch.setattr(TritonAttentionBackend, "supports_softcap", False)
    with pytest.raises(ValueError, match="soft-caps"):
        resolve_attention_backend("triton", cuda, cfg)
    gemma3 = load_model(write_hf_checkpoint(tmp_path, "gemma3", **CASES["gemma3"][1])[0])
    assert resolve_attention_backend("triton", cuda, gemma3.config) == "triton"


def test_dummy_weights_make_identity_norms(tmp_path):
    """Gemma norms scale by (1 + w): random-weight runs store w = 0, not 1."""
    path, _ = write_hf_checkpoint(tmp_path, "gemma2", **CASES["gemma2"][1])
    net = load_model(path, load_format="dummy").model
    assert torch.all(net.layers[0].pre_feedforward_layernorm.weight == 0)
    assert torch.all(net.norm.weight == 0)


def test_self_speculation_keeps_greedy_output(tmp_path):
    """The self-draft runs Gemma's first layer (its own embedding scale, local RoPE, norms)
    and verification keeps the target's greedy tokens."""
    from tests.models.parity import engine_greedy
    path, _ = checkpoint(tmp_path, "gemma3")
    prompts = random_prompts([21, 9], seed=3)
    plain = engine_greedy(path, prompts, 24)
    assert engine_greedy(path, prompts, 24, speculative="layers:1",
                         num_speculative_tokens=3) == plain


def test_gptq_refuses_gemma_layers(tmp_path):
    from peregrine.quantization.apply import QuantSpec
    from peregrine.quantization.calibrate import calibrated_quantize
    path, _ = checkpoint(tmp_path, "gemma2")
    net = load_model(path).model
    with pytest.raises(ValueError, match="Llama-structured"):
        calibrated_quantize(net, [[1, 2, 3]], QuantSpec("int4", 32, False), "gptq")

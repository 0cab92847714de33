"""Qwen2-MoE (shared expert behind a sigmoid gate, q/k/v bias, dense layers among sparse
ones) and Qwen3-MoE (Qwen3's q/k norms, renormalized top-k) equal transformers."""

from __future__ import annotations

import json
import os

import pytest

from peregrine.layers.moe import FusedExperts, SparseMoE
from peregrine.models.config import ModelConfig
from peregrine.models.llama import MLP
from peregrine.models.loader import load_model
from tests.conftest import write_hf_checkpoint
from tests.models.parity import (assert_greedy_matches, assert_logits_match, random_prompts,
                                 sharpen_experts)

# 3 layers, the middle one dense (mlp_only_layers); decoder_sparse_step has its own test
QWEN2_MOE = dict(num_hidden_layers=3, num_experts=6, num_experts_per_tok=2,
                 moe_intermediate_size=32, shared_expert_intermediate_size=48,
                 mlp_only_layers=[1], norm_topk_prob=False)
QWEN3_MOE = dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, head_dim=32,
                 norm_topk_prob=True, rope_theta=1000000.0)


def checkpoint(tmp_path, family: str, **overrides) -> tuple[str, object]:
    """A tiny random Qwen MoE whose routing and experts matter in the logits."""
    base = QWEN2_MOE if family == "qwen2_moe" else QWEN3_MOE
    path, ref = write_hf_checkpoint(tmp_path, family, **{**base, **overrides})
    sharpen_experts(ref, path)
    return path, ref


def test_qwen2_moe_logits_match_transformers(tmp_path):
    path, ref = checkpoint(tmp_path, "qwen2_moe")
    layers = load_model(path).model.layers
    assert [type(layer.mlp) for layer in layers] == [SparseMoE, MLP, SparseMoE]
    assert layers[0].mlp.shared_expert is not None
    assert_logits_match(path, ref, random_prompts([7, 29]))


def test_qwen2_moe_sparse_step_logits_match_transformers(tmp_path):
    """decoder_sparse_step 2: only layers 2, 4, ... (1-based) are sparse; renormalized."""
    path, ref = checkpoint(tmp_path, "qwen2_moe", decoder_sparse_step=2, mlp_only_layers=[],
                           norm_topk_prob=True, num_hidden_layers=2)
    layers = load_model(path).model.layers
    assert [type(layer.mlp) for layer in layers] == [MLP, SparseMoE]
    assert_logits_match(path, ref, random_prompts([11, 6]))


def test_qwen3_moe_logits_match_transformers(tmp_path):
    path, ref = checkpoint(tmp_path, "qwen3_moe")
    assert_logits_match(path, ref, random_prompts([7, 29]))


# 32 tokens take over 20 s on the shared 2-core machine: slow, 8 in the default run
@pytest.mark.parametrize("tokens", [8, pytest.param(32, marks=pytest.mark.slow)])
@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_greedy_alone_batched_and_chunked_match_transformers(tmp_path, family, tokens):
    path, ref = checkpoint(tmp_path, family)
    assert_greedy_matches(path, ref, n=tokens)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_config_and_param_count(tmp_path, family):
    path, ref = checkpoint(tmp_path, family)
    cfg = load_model(path).config
    assert cfg.architecture == family
    assert cfg.num_params() == sum(p.numel() for p in ref.parameters())
    if family == "qwen2_moe":
        assert (cfg.attention_bias, cfg.qk_norm, cfg.norm_topk_prob, cfg.mlp_only_layers,
                cfg.shared_expert_intermediate_size) == (True, False, False, [1], 48)
    else:
        assert (cfg.attention_bias, cfg.qk_norm, cfg.norm_topk_prob, cfg.num_experts,
                cfg.num_experts_per_tok) == (False, True, True, 8, 3)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_quantized_checkpoint_config_round_trips(tmp_path, family):
    """The config.json a quantized checkpoint writes reads back as the same ModelConfig."""
    from peregrine.quantization.checkpoint import hf_config
    path, _ = checkpoint(tmp_path, family)
    with open(os.path.join(path, "config.json")) as f:
        cfg = ModelConfig.from_hf(json.load(f))
    assert ModelConfig.from_hf(json.loads(json.dumps(hf_config(cfg)))) == cfg


def test_shipped_qwen3_30b_a3b_config():
    from peregrine.models.loader import _read_config
    from peregrine.models.registry import resolve_model
    cfg = ModelConfig.from_hf(_read_config(resolve_model("qwen3-30b-a3b").path))
    assert (cfg.architecture, cfg.num_experts, cfg.num_experts_per_tok, cfg.qk_norm) == (
        "qwen3_moe", 128, 8, True)
    # the published sizes: 30.5B parameters, 3.3B active
    assert abs(cfg.num_params() / 1e9 - 30.53) < 0.01
    assert abs(cfg.num_params(active=True) / 1e9 - 3.35) < 0.01


@pytest.mark.parametrize("family,arch", [("qwen2_moe", "qwen2moe"), ("qwen3_moe", "qwen3moe")])
def test_gguf_logits_match_transformers(tmp_path, smollm2_path, family, arch):
    """llama.cpp's qwen2moe / qwen3moe files: stacked ffn_*_exps experts, the router, the
    shared expert; float32 experts load as float under auto and --quantization gguf alike
    (quantized ones keep their blocks: test_moe_gguf_native.py)."""
    from peregrine.models.gguf_file import GGUFFile
    from tests.models.moe_gguf import write_moe_gguf
    # all layers sparse: llama.cpp's MoE files have no mlp_only_layers
    _, ref = checkpoint(tmp_path, family, mlp_only_layers=[])
    path = str(tmp_path / f"{arch}.gguf")
    write_moe_gguf(path, ref, arch, GGUFFile(smollm2_path).metadata)
    loaded = load_model(path)
    hf = load_model(os.path.join(tmp_path, family)).config
    for field in ("architecture", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "shared_expert_intermediate_size", "norm_topk_prob", "qk_norm",
                  "attention_bias"):
        assert getattr(loaded.config, field) == getattr(hf, field), field
    assert_logits_match(path, ref, random_prompts([7, 29]))
    assert isinstance(loaded.model.layers[0].mlp.experts, FusedExperts)
    assert isinstance(load_model(path, quantization="gguf").model.layers[0].mlp.experts,
                      FusedExperts)

"""Phi-3 equals transformers: fused qkv_proj / gate_up_proj checkpoint tensors, and
longrope ("su") scaling with short factors before the original context and long ones after."""

from __future__ import annotations

import json
import os

import pytest
import torch

from peregrine.layers.rotary import longrope_attention_factor
from peregrine.models.config import ModelConfig
from peregrine.models.loader import load_model
from tests.conftest import write_hf_checkpoint
from tests.models.parity import (assert_greedy_matches, assert_logits_match, hf_cached_greedy,
                                 random_prompts, sharpen_attention)

HEAD_HALF = 8  # head_dim 16 / 2: one factor per rotary frequency


def longrope(orig: int) -> dict:
    g = torch.Generator().manual_seed(5)
    return dict(original_max_position_embeddings=orig, rope_scaling={
        "type": "longrope",
        "short_factor": (1 + torch.rand(HEAD_HALF, generator=g)).tolist(),
        "long_factor": (1 + 8 * torch.rand(HEAD_HALF, generator=g)).tolist()})


def test_logits_match_transformers(tmp_path):
    path, ref = write_hf_checkpoint(tmp_path, "phi3")
    assert_logits_match(path, ref, random_prompts([7, 29]))


@pytest.mark.parametrize("kind", ["longrope", "su"])
def test_longrope_logits_match_transformers_within_the_original_context(tmp_path, kind):
    """Prompts shorter than original_max_position_embeddings: the short factors, and the
    attention factor from max_position_embeddings (512) over the original length (64)."""
    path, ref = write_hf_checkpoint(tmp_path, "phi3", **longrope(64))
    sharpen_attention(ref, path)
    if kind == "su":  # early Phi-3 configs' name, which transformers 5 no longer builds
        cfg_file = os.path.join(path, "config.json")
        with open(cfg_file) as f:
            cfg = json.load(f)
        cfg["rope_scaling"] = {**cfg.pop("rope_parameters"), "type": "su"}
        cfg["rope_scaling"].pop("rope_type")
        with open(cfg_file, "w") as f:
            json.dump(cfg, f)
    assert_logits_match(path, ref, random_prompts([7, 40]))


def test_longrope_logits_match_transformers_past_the_original_context(tmp_path):
    """transformers switches a whole forward to the long factors once it passes the
    original context; ours switches per position, so a prompt starting at 0 agrees
    below it only in the positions that both rotate with the short factors."""
    path, ref = write_hf_checkpoint(tmp_path, "phi3", **longrope(16))
    net = load_model(path).model
    cos_sin = net.rotary.cos_sin
    inv_long = 1 / (torch.tensor(ref.config.rope_parameters["long_factor"])
                    * 10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    mult = longrope_attention_factor(net.config.rope_scaling)
    pos = torch.arange(16, 40).float()
    want = torch.outer(pos, inv_long).cos() * mult
    torch.testing.assert_close(cos_sin[16:40, 0, :8], want)


def test_longrope_greedy_within_the_original_context_matches_transformers(tmp_path):
    """Prompts of up to 30 tokens plus 32 generated stay below the original context (64):
    short factors and the attention factor throughout, as in transformers' generate."""
    path, ref = write_hf_checkpoint(tmp_path, "phi3", **longrope(64))
    sharpen_attention(ref, path)
    assert_greedy_matches(path, ref)


def test_longrope_greedy_crossing_the_original_context_matches_transformers(tmp_path):
    """Generation runs past original_max_position_embeddings (40): transformers' forward
    with its cache then rotates each new token with the long factors, as we do.
    (Its `generate` instead recomputes the whole cache with the long factors at the
    crossing, which a paged cache shared by a batch does not do; see docs/models.md.)"""
    path, ref = write_hf_checkpoint(tmp_path, "phi3", **longrope(40))
    sharpen_attention(ref, path)
    assert_greedy_matches(path, ref, reference=hf_cached_greedy)


def test_greedy_plain_matches_transformers(tmp_path):
    path, ref = write_hf_checkpoint(tmp_path, "phi3", sliding_window=12)
    assert load_model(path).config.sliding_window == 12
    assert_greedy_matches(path, ref)


def test_fused_checkpoint_tensors_and_param_count(tmp_path):
    path, ref = write_hf_checkpoint(tmp_path, "phi3")
    names = {n for n, _ in ref.named_parameters()}
    assert "model.layers.0.self_attn.qkv_proj.weight" in names  # stored fused
    assert "model.layers.0.mlp.gate_up_proj.weight" in names
    loaded = load_model(path)
    assert loaded.model.supports_fused_cpu_decode
    assert loaded.config.num_params() == sum(p.numel() for p in ref.parameters())
    torch.testing.assert_close(loaded.model.layers[1].self_attn.qkv_proj.weight,
                               ref.model.layers[1].self_attn.qkv_proj.weight)


def test_partial_rotary_is_refused():
    from peregrine.models.errors import ModelLoadError
    with pytest.raises(ModelLoadError, match="partial"):
        ModelConfig.from_hf(dict(architectures=["Phi3ForCausalLM"], vocab_size=8, hidden_size=8,
                                 intermediate_size=8, num_hidden_layers=1,
                                 num_attention_heads=2, partial_rotary_factor=0.5,
                                 rope_scaling={"type": "longrope", "short_factor": [1.0] * 2,
                                               "long_factor": [1.0] * 2,
                                               "partial_rotary_factor": 0.5},
                                 original_max_position_embeddings=4))

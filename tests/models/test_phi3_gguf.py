"""Phi-3 from GGUF files as llama.cpp's converter writes them (fused attn_qkv, ffn_up
holding gate and up, the window, longrope factors as rope_factors_short/long tensors)
equals transformers on the same weights, and a Q8_0 file loads."""

from __future__ import annotations

import pytest
import torch

from peregrine.models.errors import ModelLoadError
from peregrine.models.gguf_file import GGUFFile
from peregrine.models.loader import load_model
from tests.conftest import write_hf_checkpoint
from tests.models.gguf_writer import round_matrices, write_phi3_gguf
from tests.models.parity import (assert_greedy_matches, assert_logits_match, random_prompts,
                                 sharpen_attention)
from tests.models.test_phi3 import longrope


def gguf_checkpoint(tmp_path, smollm2_path: str, qtype: str = "F32", sharpen: bool = False,
                    **overrides) -> tuple[str, torch.nn.Module]:
    """A tiny random Phi-3 written as a GGUF file, and its transformers model."""
    path, ref = write_hf_checkpoint(tmp_path, "phi3", **overrides)
    if sharpen:  # random attention is too flat to show the longrope attention factor
        sharpen_attention(ref, path)
    out = str(tmp_path / f"phi3-{qtype}.gguf")
    write_phi3_gguf(out, ref, GGUFFile(smollm2_path).metadata, qtype)
    return out, ref


def test_windowed_logits_and_greedy_match_transformers(tmp_path, smollm2_path):
    path, ref = gguf_checkpoint(tmp_path, smollm2_path, sliding_window=12)
    f = GGUFFile(path)
    assert "blk.0.attn_qkv.weight" in f.tensors and "blk.0.ffn_gate.weight" not in f.tensors
    cfg = load_model(path).config
    assert (cfg.architecture, cfg.sliding_window, cfg.rope_scaling) == ("phi3", 12, None)
    assert_logits_match(path, ref, random_prompts([7, 29]))
    assert_greedy_matches(path, ref)


def test_longrope_logits_and_greedy_match_transformers(tmp_path, smollm2_path):
    """Short factors and the attention factor below the original context (64)."""
    path, ref = gguf_checkpoint(tmp_path, smollm2_path, sharpen=True, **longrope(64))
    cfg = load_model(path).config
    want = ref.config.rope_parameters
    assert cfg.rope_scaling["rope_type"] == "longrope" and cfg.sliding_window is None
    torch.testing.assert_close(torch.tensor(cfg.rope_scaling["short_factor"]),
                               torch.tensor(want["short_factor"]))
    torch.testing.assert_close(torch.tensor(cfg.rope_scaling["long_factor"]),
                               torch.tensor(want["long_factor"]))
    assert cfg.rope_scaling["original_max_position_embeddings"] == 64
    assert_logits_match(path, ref, random_prompts([7, 40]))
    assert_greedy_matches(path, ref, n=16)


def test_longrope_tables_equal_the_hf_directory(tmp_path, smollm2_path):
    """Past the original context (16) too: the long factors, the same cos/sin table."""
    path, _ = gguf_checkpoint(tmp_path, smollm2_path, **longrope(16))
    ours = load_model(path).model.rotary.cos_sin
    hf = load_model(str(tmp_path / "phi3")).model.rotary.cos_sin
    torch.testing.assert_close(ours, hf, rtol=0, atol=1e-6)


def test_q8_0_file_equals_transformers_on_the_rounded_weights(tmp_path, smollm2_path):
    path, ref = gguf_checkpoint(tmp_path, smollm2_path, qtype="Q8_0")
    assert GGUFFile(path).tensors["blk.1.ffn_up.weight"].qtype.name == "Q8_0"
    round_matrices(ref, "Q8_0")
    assert_logits_match(path, ref, random_prompts([7, 29]))


def test_fused_tensors_load_dequantized_not_as_native_blocks(tmp_path, smollm2_path):
    """The GGUF-native linears fuse attn_q/k/v and ffn_gate/up themselves: a Phi-3 file's
    fused tensors load dequantized under auto, and `gguf` says why it cannot."""
    path, _ = gguf_checkpoint(tmp_path, smollm2_path, qtype="Q8_0")
    assert load_model(path, quantization="auto").model.layers[0].self_attn.qkv_proj.weight.dtype \
        == torch.float32
    with pytest.raises(ModelLoadError, match="fused"):
        load_model(path, quantization="gguf")

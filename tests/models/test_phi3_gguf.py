"""Phi-3 from GGUF files as llama.cpp's converter writes them (fused attn_qkv, ffn_up
holding gate and up, the window, longrope factors as rope_factors_short/long tensors)
equals transformers on the same weights; Q8_0 and Q4_0 files serve from their blocks
through the fused step."""

from __future__ import annotations

import pytest
import torch

from peregrine.attention_backend import AttentionMetadata, allocate_kv_pool
from peregrine.engine.cpu_decode import fused_decode_runner
from peregrine.layers.linear import Int4Linear, Int8Linear
from peregrine.models.gguf_file import GGUFFile
from peregrine.models.loader import load_model
from tests.conftest import write_hf_checkpoint
from tests.engine.test_cpu_decode import int8_dots
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


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_fused_tensors_stay_in_their_blocks_and_serve_fused(tmp_path, smollm2_path, qtype):
    """attn_qkv and ffn_up are already qkv_proj's and gate_up_proj's rows: under auto they
    are kept in their blocks as stored (the same weights as the dequantizing loader's),
    the step runs fused, and its logits equal the dequantized-weights model's within what
    int8 activations cost (the eager modules on the same blocks cost as much)."""
    path, _ = gguf_checkpoint(tmp_path, smollm2_path, qtype=qtype, sliding_window=12)
    cls = Int8Linear if qtype == "Q8_0" else Int4Linear
    native = load_model(path, quantization="auto").model  # the engine's default
    floats = load_model(path, quantization="none").model
    assert dict(native.named_modules()).keys() == dict(floats.named_modules()).keys()
    for name, lin in native.named_modules():
        if name.endswith(("qkv_proj", "o_proj", "gate_up_proj", "down_proj")):
            assert isinstance(lin, cls), name
            assert torch.equal(lin.dequantize(), floats.get_submodule(name).weight), name
    pool = allocate_kv_pool(native.config, 16, 4, torch.float32, torch.device("cpu"))
    runner = fused_decode_runner(native, pool)
    assert runner is not None
    lens = [9, 29]  # the second past the window
    prompts = random_prompts(lens)
    meta = AttentionMetadata.build([0, 9, 38], lens, slot_mapping=torch.tensor(
        list(range(9)) + list(range(12, 41))), block_tables=torch.tensor(
        [[0, 1, 2, 0, 0, 0, 0, 0], [3, 4, 5, 6, 7, 8, 9, 10]], dtype=torch.int32))
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(n) for n in lens])
    with torch.inference_mode():
        fused = native.compute_logits(runner.run(ids, positions, meta))
        with int8_dots(True):  # the modules on the int8 activations the fused step uses
            modules = native.compute_logits(native(ids, positions,
                                                   AttentionMetadata.prefill_only(lens)))
        want = floats.compute_logits(floats(ids, positions, AttentionMetadata.prefill_only(
            lens)))
    assert (modules - want).abs().amax() > 0  # the modules' int8 activations round too
    scale = want.abs().amax()
    assert (fused - want).abs().amax() <= 0.02 * scale
    assert (fused - want).norm() <= 1.3 * (modules - want).norm() + 1e-4
    assert torch.equal(fused.argmax(-1), want.argmax(-1))


def test_gguf_quantization_keeps_phi3_blocks(tmp_path, smollm2_path):
    path, _ = gguf_checkpoint(tmp_path, smollm2_path, qtype="Q8_0")
    net = load_model(path, quantization="gguf").model
    assert isinstance(net.layers[0].mlp.gate_up_proj, Int8Linear)

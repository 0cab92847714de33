"""Gemma 2 and Gemma 3 from GGUF files as llama.cpp's converter writes them (norms stored
as 1 + w, Gemma's own norm names, soft-caps and the window in metadata, the local layers
by llama.cpp's default pattern or a per-layer array) equal transformers on the same
weights, and a Q8_0 file loads."""

from __future__ import annotations

import pytest
import torch

from peregrine.attention_backend import AttentionMetadata
from peregrine.layers.linear import Int8Linear
from peregrine.models.config import FULL, SLIDING, ModelConfig
from peregrine.models.errors import ModelLoadError
from peregrine.models.gguf_file import GGUFFile
from peregrine.models.loader import load_model
from tests.conftest import write_hf_checkpoint
from tests.models.gguf_writer import round_matrices, write_gemma_gguf
from tests.models.test_gemma import CASES as HF_CASES
from tests.models.parity import (assert_greedy_matches, assert_logits_match, hf_generate,
                                 random_prompts, sharpen_attention)

# The HF tests' cases, with the scale a GGUF file implies (it has no query_pre_attn_scalar:
# llama.cpp scales by head_dim^-1/2 below 27B) and, in the linear-rope case, a local RoPE
# base of its own for the sliding layers (not the 10000 default).
CASES = {name: (family, {**kw, "query_pre_attn_scalar": 16})
         for name, (family, kw) in HF_CASES.items()}
CASES["gemma3-linear-rope"][1]["rope_parameters"] = {
    FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
    SLIDING: {"rope_type": "default", "rope_theta": 20000.0}}


def gguf_checkpoint(tmp_path, case: str, smollm2_path: str, qtype: str = "F32"
                    ) -> tuple[str, torch.nn.Module]:
    """The GGUF file of `case`'s tiny random transformers model, and that model."""
    family, overrides = CASES[case]
    path, ref = write_hf_checkpoint(tmp_path, family, **overrides)
    if case == "gemma2-low-caps":  # random scores are too small to reach a cap
        sharpen_attention(ref, path)
    out = str(tmp_path / f"{case}-{qtype}.gguf")
    write_gemma_gguf(out, ref, GGUFFile(smollm2_path).metadata, qtype)
    return out, ref


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, smollm2_path, case):
    path, ref = gguf_checkpoint(tmp_path, case, smollm2_path)
    # two sequences in one flat batch, the second three windows long
    assert_logits_match(path, ref, random_prompts([6, 27]))


@pytest.mark.parametrize("case", ["gemma2-low-caps", "gemma3"])
def test_greedy_alone_batched_and_chunked_match_transformers(tmp_path, smollm2_path, case):
    path, ref = gguf_checkpoint(tmp_path, case, smollm2_path)
    assert_greedy_matches(path, ref)


def test_config_and_weights_equal_the_hf_directory(tmp_path, smollm2_path):
    """The GGUF path builds the model the HF path builds: same config fields, and the same
    parameters (norms back to w from the stored 1 + w)."""
    for case in ("gemma2-low-caps", "gemma3-linear-rope"):
        path, _ = gguf_checkpoint(tmp_path / case, case, smollm2_path)
        hf, gg = load_model(str(tmp_path / case / CASES[case][0])), load_model(path)
        for field in ("layer_types", "local_window", "sliding_window", "qk_norm", "hidden_act",
                      "query_pre_attn_scalar", "attn_logit_softcapping",
                      "final_logit_softcapping", "rope_theta", "rope_local_theta",
                      "rope_scaling", "head_dim", "tie_word_embeddings"):
            want = getattr(hf.config, field)
            if isinstance(want, float):  # GGUF stores float32
                want = pytest.approx(want, rel=1e-7)
            assert getattr(gg.config, field) == want, (case, field)
        ours = dict(gg.model.named_parameters())
        for name, p in hf.model.named_parameters():
            torch.testing.assert_close(ours[name], p, rtol=0, atol=1e-6, msg=name)


def test_q8_0_file_equals_transformers_on_the_rounded_weights(tmp_path, smollm2_path):
    """A Q8_0 file gives transformers' logits once transformers' matrices are rounded
    through gguf's own Q8_0 quantize/dequantize (norms stay float32, as llama.cpp keeps
    them), dequantized at load or kept in its blocks."""
    path, ref = gguf_checkpoint(tmp_path, "gemma3", smollm2_path, qtype="Q8_0")
    f = GGUFFile(path)
    assert f.tensors["blk.0.attn_q.weight"].qtype.name == "Q8_0"
    assert f.tensors["blk.0.post_ffw_norm.weight"].qtype.name == "F32"
    round_matrices(ref, "Q8_0")
    assert_logits_match(path, ref, random_prompts([6, 27]))
    # served from its blocks (what `auto` does on a CPU): the same logits to rounding
    native = load_model(path, quantization="gguf").model
    assert isinstance(native.layers[0].self_attn.qkv_proj, Int8Linear)
    prompt = random_prompts([27])[0]
    with torch.inference_mode():
        got = native.compute_logits(native(torch.tensor(prompt), torch.arange(27),
                                           AttentionMetadata.prefill_only([27])))
        want = ref(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)


def test_metadata_defaults_follow_llama_cpp():
    """Keys a converted file leaves out: Gemma 2's caps (50, 30) and window (4096), every
    second layer local; Gemma 3 every sixth layer global, local RoPE base 10000, no caps;
    without a window every layer global; 27B files scale by hidden / heads."""
    def meta(arch: str, layers: int, **keys) -> dict:
        return {"general.architecture": arch, f"{arch}.block_count": layers,
                f"{arch}.embedding_length": 64, f"{arch}.feed_forward_length": 128,
                f"{arch}.attention.head_count": 4, f"{arch}.attention.key_length": 32,
                f"{arch}.vocab_size": 8, **{f"{arch}.{k}": v for k, v in keys.items()}}
    g2 = ModelConfig.from_gguf(meta("gemma2", 4), False, False)
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping) == (50.0, 30.0)
    assert [g2.layer_window(i) for i in range(4)] == [4096, None, 4096, None]
    assert g2.query_pre_attn_scalar == 32 and g2.sliding_window is None
    g3 = ModelConfig.from_gguf(meta("gemma3", 7, **{"attention.sliding_window": 512}),
                               False, False)
    assert [g3.layer_window(i) for i in range(7)] == [512] * 5 + [None, 512]
    assert (g3.rope_local_theta, g3.attn_logit_softcapping, g3.final_logit_softcapping,
            g3.qk_norm) == (10000.0, None, None, True)
    assert ModelConfig.from_gguf(meta("gemma3", 3), False, False).layer_types == [FULL] * 3
    g27 = ModelConfig.from_gguf(meta("gemma3", 62, **{"attention.sliding_window": 8}),
                                False, False)
    assert g27.query_pre_attn_scalar == 64 // 4


def test_gemma_1_files_are_refused_by_name(tmp_path):
    meta = {"general.architecture": "gemma", "gemma.block_count": 1}
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'gemma'.*gemma2"):
        ModelConfig.from_gguf(meta, False, False)


def test_text_in_and_out_with_the_files_sentencepiece_vocabulary(tmp_path):
    """A Gemma file's own SentencePiece vocabulary (tokenizer.ggml.model "llama") serves
    text prompts: BOS added, no prefix space, generated ids decoded."""
    from peregrine import LLM, SamplingParams
    from tests.models.test_tokenizer import spm_meta
    meta = spm_meta("gemma3")
    vocab = len(meta["tokenizer.ggml.tokens"])
    _, ref = write_hf_checkpoint(tmp_path, "gemma3", vocab_size=vocab, **CASES["gemma3"][1])
    path = str(tmp_path / "spm.gguf")
    write_gemma_gguf(path, ref, meta)
    llm = LLM(path, dtype="float64", block_size=4, num_kv_blocks=64)
    out = llm.generate(["hello world"], SamplingParams(temperature=0, max_tokens=6,
                                                       ignore_eos=True))[0]
    assert out.prompt_token_ids == [1, 20, 26]  # <s> hello ▁world
    want = hf_generate(ref.double(), [1, 20, 26], 6)
    assert out.outputs[0].token_ids == want
    assert out.outputs[0].text == llm.engine.tokenizer.decode(want, skip_special_tokens=True)

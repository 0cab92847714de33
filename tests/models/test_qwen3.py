"""Qwen3 (per-head q/k RMSNorm, explicit head_dim, no qkv bias) equals transformers."""

from __future__ import annotations

import pytest

from peregrine.engine.cpu_decode import fusable
from peregrine.models.loader import load_model
from tests.conftest import write_hf_checkpoint
from tests.models.gguf_writer import write_model_gguf
from tests.models.parity import assert_greedy_matches, assert_logits_match, random_prompts

# head_dim 32 is not hidden / heads (16): the explicit value must be used.
QWEN3 = dict(head_dim=32, rope_theta=1000000.0)


def test_logits_match_transformers(tmp_path):
    path, ref = write_hf_checkpoint(tmp_path, "qwen3", **QWEN3)
    assert_logits_match(path, ref, random_prompts([7, 29]))


def test_tied_mqa_logits_match_transformers(tmp_path):
    path, ref = write_hf_checkpoint(tmp_path, "qwen3", tie_word_embeddings=True,
                                    num_key_value_heads=1, **QWEN3)
    assert_logits_match(path, ref, random_prompts([12, 5]))


def test_greedy_alone_batched_and_chunked_match_transformers(tmp_path):
    path, ref = write_hf_checkpoint(tmp_path, "qwen3", **QWEN3)
    assert_greedy_matches(path, ref)


def test_config_and_param_count(tmp_path):
    path, ref = write_hf_checkpoint(tmp_path, "qwen3", **QWEN3)
    loaded = load_model(path)
    cfg = loaded.config
    assert (cfg.architecture, cfg.head_dim, cfg.qk_norm, cfg.attention_bias) == (
        "qwen3", 32, True, False)
    assert cfg.sliding_window is None
    assert cfg.num_params() == sum(p.numel() for p in ref.parameters())
    assert loaded.model.layers[0].self_attn.q_norm.weight.shape == (32,)


def test_the_fused_cpu_step_runs_it(tmp_path):
    """The C++ step norms each q/k head too: an int4 Qwen3 decodes fused, with the eager
    modules' greedy tokens (tests/engine/test_cpu_decode_arch.py checks it step by step)."""
    from peregrine import LLM, SamplingParams
    path, _ = write_hf_checkpoint(tmp_path, "qwen3", **QWEN3)
    engine = dict(quantization="int4", block_size=4, num_kv_blocks=64)
    fused = LLM(path, **engine)
    assert fusable(fused.engine.runner.model, fused.engine.runner.kv_caches) is None
    assert fused.engine.runner.fused is not None
    eager = LLM(path, enforce_eager=True, **engine)
    prompts = [{"prompt_token_ids": p} for p in random_prompts([7, 29])]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in fused.generate(prompts, params)]
    assert got == [o.outputs[0].token_ids for o in eager.generate(prompts, params)]


@pytest.mark.parametrize("name", ["qwen3-0.6b", "qwen3-8b"])
def test_shipped_config_builds(name):
    from peregrine.models.config import ModelConfig
    from peregrine.models.loader import _read_config
    from peregrine.models.registry import resolve_model
    cfg = ModelConfig.from_hf(_read_config(resolve_model(name).path), name)
    assert cfg.architecture == "qwen3" and cfg.qk_norm and cfg.head_dim == 128
    # the published sizes: 0.6B (0.44B without the tied embedding), 8.2B
    billions = {"qwen3-0.6b": 0.596, "qwen3-8b": 8.19}[name]
    assert abs(cfg.num_params() / 1e9 - billions) < 0.01


def test_gguf_logits_match_transformers(tmp_path, smollm2_path):
    from peregrine.models.gguf_file import GGUFFile
    _, ref = write_hf_checkpoint(tmp_path, "qwen3", **QWEN3)
    path = str(tmp_path / "qwen3.gguf")
    write_model_gguf(path, ref, "qwen3", GGUFFile(smollm2_path).metadata,
                     head_dim=ref.config.head_dim)
    cfg = load_model(path).config
    assert (cfg.architecture, cfg.qk_norm, cfg.head_dim, cfg.vocab_size) == ("qwen3", True, 32,
                                                                             256)
    assert_logits_match(path, ref, random_prompts([7, 29]))

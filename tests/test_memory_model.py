"""The memory model against what the engine really allocates: the loaded model's parameters
and buffers, the KV pool's tensors, the blocks a sliding-window sequence holds."""

from __future__ import annotations

import pytest
import torch

from peregrine.attention_backend import allocate_kv_pool
from peregrine.memory_model import (blocks_per_sequence, held_kv_bytes, held_weight_bytes,
                                    kv_bytes_per_token, kv_dtype_bytes, kv_pool_bytes,
                                    num_blocks_for_memory, quantization_plan, weight_bytes)
from peregrine.models.config import ModelConfig
from peregrine.models.gguf_native import gguf_module_types
from peregrine.models.loader import load_model
from peregrine.sampling_params import SamplingParams
from tests.conftest import TINY_LLAMA, tiny_config_dir

# A second dummy shape: Qwen2-style (q/k/v biases), tied embeddings, a sliding window.
TINY_QWEN = dict(TINY_LLAMA, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                 hidden_size=96, intermediate_size=160, num_attention_heads=6,
                 num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True,
                 sliding_window=32, vocab_size=640)
# A third: a Qwen2-style mixture of experts with a shared expert and one dense layer.
TINY_MOE = dict(TINY_LLAMA, architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe",
                num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=64, shared_expert_intermediate_size=96,
                mlp_only_layers=[1])


def predicted_weight_bytes(loaded, quantization: str, dtype: torch.dtype,
                           max_len: int) -> int:
    types = gguf_module_types(loaded.gguf, loaded.config) if loaded.gguf else None
    plan = quantization_plan(loaded.config, quantization, None, types)
    return weight_bytes(loaded.config, plan, dtype, max_len).total


@pytest.mark.parametrize("quantization", ["none", "int8", "int4", "gguf"])
def test_smollm2_weights_match_the_loaded_model(quantization):
    loaded = load_model(None, quantization=quantization, max_model_len=2048)
    real = held_weight_bytes(loaded.model)
    predicted = predicted_weight_bytes(loaded, quantization, torch.float32, 2048)
    assert abs(predicted - real) <= 0.05 * real
    assert predicted == real  # every byte is accounted for, not just 95% of them


def test_a_k_quant_file_kept_in_its_blocks_matches_the_loaded_model(smollm2_q4_k_m_path):
    loaded = load_model(smollm2_q4_k_m_path, quantization="gguf", max_model_len=2048)
    assert predicted_weight_bytes(loaded, "gguf", torch.float32, 2048) == \
        held_weight_bytes(loaded.model)


@pytest.mark.parametrize("shape", ["llama", "qwen2", "moe"])
@pytest.mark.parametrize("quantization", ["none", "int8", "int4", "nf4"])
def test_dummy_config_weights_match_the_loaded_model(tmp_path_factory, shape, quantization):
    overrides = {"llama": {}, "qwen2": TINY_QWEN, "moe": TINY_MOE}[shape]
    path = tiny_config_dir(tmp_path_factory, **overrides)
    loaded = load_model(path, load_format="dummy", quantization=quantization,
                        dtype=torch.bfloat16, max_model_len=256)
    assert predicted_weight_bytes(loaded, quantization, torch.bfloat16, 256) == \
        held_weight_bytes(loaded.model)


def test_kv_pool_bytes_match_the_allocated_pool():
    cfg = ModelConfig("llama", 512, 64, 128, 3, 4, 2, 16)
    for kv in ("auto", "int8", "fp8"):
        for dtype in (torch.float32, torch.bfloat16):
            pool = allocate_kv_pool(cfg, 7, 8, dtype, torch.device("cpu"), kv)
            assert kv_pool_bytes(cfg, 7, 8, kv, dtype) == held_kv_bytes(pool), (kv, dtype)


def test_engine_sizes_its_pool_with_the_memory_model(tiny_model_dir):
    from peregrine import LLM
    llm = LLM(tiny_model_dir, load_format="dummy", kv_cache_memory=0.01, block_size=8)
    engine = llm.engine
    cfg, dtype = engine.model_config, engine.config.torch_dtype
    blocks = num_blocks_for_memory(cfg, 8, kv_dtype_bytes("auto", dtype, cfg.head_dim),
                                   0.01 * 2**30)
    assert engine.kv.num_blocks == blocks
    real = sum(t.numel() * t.element_size() for c in engine.kv_caches for t in (c.k, c.v))
    assert real == kv_pool_bytes(cfg, blocks, 8, "auto", dtype)
    assert real <= 0.01 * 2**30 < real + kv_pool_bytes(cfg, 1, 8, "auto", dtype)


def test_kv_cache_dtype_and_window_change_kv_bytes():
    cfg = ModelConfig("mistral", 1000, 64, 128, 4, 4, 2, 32, sliding_window=100)
    f32 = kv_bytes_per_token(cfg, "auto", torch.float32)
    assert f32 == 2 * 4 * 2 * 32 * 4
    assert kv_bytes_per_token(cfg, "auto", torch.bfloat16) == f32 / 2
    # one byte per value plus a float32 scale per (token, KV head)
    assert kv_bytes_per_token(cfg, "int8", torch.float32) == 2 * 4 * 2 * (32 + 4)
    assert blocks_per_sequence(1000, 16) == 63
    assert blocks_per_sequence(1000, 16, 100) == 8  # ceil(100 / 16) + 1 partly-freed block
    assert blocks_per_sequence(50, 16, 100) == 4  # inside the window: no saving


@pytest.mark.parametrize("window,block_size,tokens", [(8, 4, 41), (10, 4, 37), (6, 2, 30)])
def test_blocks_per_sequence_is_what_a_decoding_sequence_holds(tmp_path_factory, window,
                                                               block_size, tokens):
    from peregrine import LLM
    path = tiny_config_dir(tmp_path_factory, architectures=["MistralForCausalLM"],
                           model_type="mistral", sliding_window=window)
    engine = LLM(path, load_format="dummy", block_size=block_size, num_kv_blocks=64).engine
    peak = 0

    def observe(batch) -> None:  # blocks are allocated for the step, none freed yet
        nonlocal peak
        peak = max(peak, engine.kv.num_blocks - engine.kv.num_free_blocks)
    engine.batch_observer = observe
    engine.add_request("a", {"prompt_token_ids": [5]},
                       SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    # the last sampled token is never computed: the steps computed `tokens` tokens
    assert peak == blocks_per_sequence(tokens, block_size, window)


def test_held_weight_bytes_counts_shared_storage_once():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied, as the loader ties embeddings and LM head
    net = torch.nn.ModuleList([emb, head])
    assert held_weight_bytes(net) == 10 * 4 * 4

"""LoRA in the engine: the eager modules run (the fused CPU step computes no deltas, and
says so), on quantized bases too; LoRA is refused where it cannot work."""

from __future__ import annotations

import copy

import pytest
import torch

from peregrine import LLM, EngineConfig, LoRARequest, SamplingParams
from peregrine.engine.cpu_decode import fusable
from tests.models.parity import hf_cached_greedy, random_prompts


def test_the_fused_cpu_step_is_off_with_lora_and_says_why(tiny_base):
    quantized = dict(dtype="float32", quantization="int4", quantization_group_size=32,
                     num_kv_blocks=64)
    plain = LLM(tiny_base[0], **quantized)
    with_lora = LLM(tiny_base[0], enable_lora=True, **quantized)
    if plain.engine.runner.fused is None:
        pytest.skip("the C++ kernels are unavailable here")
    assert with_lora.engine.runner.fused is None
    reason = fusable(with_lora.engine.runner.model, with_lora.engine.kv_caches)
    assert reason is not None and "LoRA" in reason


def dequantized_reference(llm: LLM, peft_model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the PEFT model whose base weights are the engine's dequantized ones."""
    ref = copy.deepcopy(peft_model).double()
    cfg = llm.engine.model_config
    for ours, theirs in zip(llm.engine.runner.model.layers, ref.base_model.model.model.layers):
        q, k, v = ours.self_attn.qkv_proj.base.dequantize().split(
            [cfg.q_size, cfg.kv_size, cfg.kv_size])
        gate, up = ours.mlp.gate_up_proj.base.dequantize().chunk(2)
        attn, mlp = theirs.self_attn, theirs.mlp
        for module, w in ((attn.q_proj, q), (attn.k_proj, k), (attn.v_proj, v),
                          (attn.o_proj, ours.self_attn.o_proj.base.dequantize()),
                          (mlp.gate_proj, gate), (mlp.up_proj, up),
                          (mlp.down_proj, ours.mlp.down_proj.base.dequantize())):
            module.base_layer.weight.data = w.double()
    return ref


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_an_adapter_adds_its_delta_on_a_quantized_base(tiny_base, tiny_adapters, quantization):
    """int4/int8 weights in float64 compute with exactly their dequantized values: the
    adapter's tokens are PEFT's on those values, beside the base model's in one batch."""
    llm = LLM(tiny_base[0], dtype="float64", quantization=quantization, num_kv_blocks=128,
              block_size=4, enable_lora=True, max_loras=2)
    prompts = random_prompts([11, 8], seed=4)
    adapter = tiny_adapters["all8"]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                        lora_request=[LoRARequest("all8", adapter.path), None])
    ref = dequantized_reference(llm, adapter.model)
    assert outs[0].outputs[0].token_ids == hf_cached_greedy(ref, prompts[0], 16)
    base = ref.get_base_model()
    with ref.disable_adapter():
        assert outs[1].outputs[0].token_ids == hf_cached_greedy(base, prompts[1], 16)


def test_lora_and_speculative_decoding_do_not_combine_yet():
    with pytest.raises(ValueError, match="enable_lora does not combine with speculative"):
        EngineConfig(enable_lora=True, speculative="ngram")
    with pytest.raises(ValueError, match="max_loras must be >= 1"):
        EngineConfig(max_loras=0)

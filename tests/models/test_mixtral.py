"""Mixtral (each token through the top 2 of 8 SwiGLU experts, weights renormalized) equals
transformers: logits, routing on ties, greedy tokens alone, batched and chunked; quantized
experts run on the QuantLinear kernels and stay close to float."""

from __future__ import annotations

import json
import os

import pytest
import torch

from peregrine.engine.cpu_decode import fusable
from peregrine.layers.moe import QuantExperts, route
from peregrine.models.loader import load_model
from tests.conftest import write_hf_checkpoint
from tests.models.parity import (assert_greedy_matches, assert_logits_match, flat_logits,
                                 random_prompts, sharpen_experts)

MIXTRAL = dict(num_local_experts=8, num_experts_per_tok=2, rope_theta=1000000.0)


def mixtral(tmp_path, **overrides) -> tuple[str, torch.nn.Module]:
    """A tiny random Mixtral whose routing and experts matter in the logits."""
    path, ref = write_hf_checkpoint(tmp_path, "mixtral", **{**MIXTRAL, **overrides})
    sharpen_experts(ref, path)
    return path, ref


def test_logits_match_transformers(tmp_path):
    path, ref = mixtral(tmp_path)
    assert_logits_match(path, ref, random_prompts([7, 29]))


def test_sliding_window_logits_match_transformers(tmp_path):
    path, ref = mixtral(tmp_path, sliding_window=8)
    assert load_model(path).config.sliding_window == 8
    assert_logits_match(path, ref, random_prompts([21, 12]))


def test_tied_router_picks_transformers_experts(tmp_path):
    """Layer 0's router rows all equal: every token's eight probabilities tie exactly, and
    the two experts chosen (torch.topk's pick, not the lowest ids) must be transformers'."""
    _, ref = write_hf_checkpoint(tmp_path, "mixtral", **MIXTRAL)
    path = os.path.join(tmp_path, "tied")
    with torch.no_grad():
        gate = ref.model.layers[0].mlp.gate.weight
        gate.copy_(gate[:1].expand_as(gate) * 20)
    sharpen_experts(ref, path, router=1.0)
    prompts = random_prompts([7, 11])
    want = []
    hook = ref.model.layers[0].mlp.gate.register_forward_hook(
        lambda mod, args, out: want.append(out[2]))
    assert_logits_match(path, ref, prompts)
    hook.remove()
    net = load_model(path).model
    got = []
    net.layers[0].mlp.gate.register_forward_hook(
        lambda mod, args, out: got.append(route(out, 2, True)[1]))
    flat_logits(net, prompts)
    assert torch.equal(got[0], torch.cat(want))


def test_stacked_expert_checkpoint_loads(tmp_path):
    """transformers 5's own tensor names (experts stacked [E, 2I, H] and [E, H, I]) load as
    they are."""
    from safetensors.torch import save_file
    path, ref = mixtral(tmp_path)
    stacked = os.path.join(tmp_path, "stacked")
    os.makedirs(stacked)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
              os.path.join(stacked, "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f, \
            open(os.path.join(stacked, "config.json"), "w") as g:
        g.write(f.read())
    assert "model.layers.0.mlp.experts.gate_up_proj" in ref.state_dict()
    assert_logits_match(stacked, ref, random_prompts([9, 4]))


# 32 tokens take over 20 s on the shared 2-core machine (transformers' float64 generate
# loops over experts): slow, with an 8-token sibling in the default run
@pytest.mark.parametrize("tokens", [8, pytest.param(32, marks=pytest.mark.slow)])
def test_greedy_alone_batched_and_chunked_match_transformers(tmp_path, tokens):
    path, ref = mixtral(tmp_path)
    assert_greedy_matches(path, ref, n=tokens)


def test_config_and_param_count(tmp_path):
    path, ref = mixtral(tmp_path)
    loaded = load_model(path)
    cfg = loaded.config
    assert (cfg.architecture, cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob,
            cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size) == (
        "mixtral", 8, 2, True, 128, 0)
    assert cfg.num_params() == sum(p.numel() for p in ref.parameters())
    expert = 3 * 64 * 128
    assert cfg.num_params(active=True) == cfg.num_params() - 2 * 6 * expert
    assert not loaded.model.supports_fused_cpu_decode


def test_fused_cpu_step_is_refused(tmp_path):
    """The C++ step has no experts: an int8 Mixtral runs the eager layers instead."""
    path, _ = mixtral(tmp_path)
    net = load_model(path, quantization="int8").model
    caches = [type("C", (), {"k_scale": None, "k": torch.zeros(1)})()]
    reason = fusable(net, caches)
    assert reason is not None and "mixtral" in reason


def test_quantized_experts_stay_close_to_float(tmp_path):
    """int8 / int4 experts (and the rest of the model) change the logits about as much as
    they change a dense tiny Llama's (0.8% / 10%); the engine generates with them."""
    from peregrine import LLM, SamplingParams
    # routing sharpened, experts at their trained scale: scaled experts would amplify any
    # weight error through the layers
    path, ref = write_hf_checkpoint(tmp_path, "mixtral", **MIXTRAL)
    sharpen_experts(ref, path, experts=1.0)
    prompts = random_prompts([12, 5])
    want = flat_logits(load_model(path).model, prompts)
    for method, bound in (("int8", 0.02), ("int4", 0.15)):
        net = load_model(path, quantization=method, quant_group_size=32).model
        assert isinstance(net.layers[1].mlp.experts, QuantExperts)
        got = flat_logits(net, prompts)
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < bound, (method, rel)
    llm = LLM(path, quantization="int4", quantization_group_size=32, num_kv_blocks=64,
              block_size=4)
    out = llm.generate([{"prompt_token_ids": p} for p in prompts],
                       SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in out] == [6, 6]


def test_quantized_checkpoint_round_trips(tmp_path):
    """`peregrine quantize`'s checkpoint of a Mixtral (one int4 linear per expert
    projection) loads back into the same model."""
    from peregrine.quantization.checkpoint import save_quantized
    path, _ = mixtral(tmp_path)
    loaded = load_model(path, quantization="int4", quant_group_size=32)
    out = os.path.join(tmp_path, "q")
    save_quantized(loaded.model, loaded.config, loaded.tokenizer, out, {"method": "int4"})
    with open(os.path.join(out, "config.json")) as f:
        modules = json.load(f)["quantization_config"]["modules"]
    assert modules["layers.0.mlp.experts.down_proj.7"] == "int4"
    back = load_model(out)
    assert isinstance(back.model.layers[0].mlp.experts, QuantExperts)
    prompts = random_prompts([6, 9])
    torch.testing.assert_close(flat_logits(back.model, prompts),
                               flat_logits(loaded.model, prompts), rtol=0, atol=0)


def test_gguf_logits_match_transformers(tmp_path, smollm2_path):
    """A llama.cpp Mixtral file: llama metadata with an expert count, Q/K rows permuted,
    stacked ffn_*_exps experts."""
    from peregrine.models.gguf_file import GGUFFile
    from tests.models.moe_gguf import write_moe_gguf
    _, ref = mixtral(tmp_path)
    path = str(tmp_path / "mixtral.gguf")
    write_moe_gguf(path, ref, "llama", GGUFFile(smollm2_path).metadata)
    cfg = load_model(path).config
    assert (cfg.architecture, cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob,
            cfg.moe_intermediate_size) == ("mixtral", 8, 2, True, 128)
    assert_logits_match(path, ref, random_prompts([7, 29]))

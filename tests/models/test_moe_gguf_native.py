"""A mixture of experts' GGUF file keeps its quantized blocks by default: the stacked
ffn_*_exps become QuantExperts (one native linear per expert and projection), Qwen2-MoE's
shared expert native linears, the routers float; the same weights as the dequantizing
loader's, logits within what int8 activations cost, the same greedy tokens."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from peregrine.layers.linear import Int4Linear, Int8Linear, QuantLinear
from peregrine.layers.moe import FloatLinear, FusedExperts, QuantExperts, route
from peregrine.memory_model import held_weight_bytes, quantization_plan, weight_bytes
from peregrine.models.gguf_file import GGUFFile
from peregrine.models.gguf_native import gguf_module_types
from peregrine.models.loader import load_model
from tests.conftest import write_hf_checkpoint
from tests.engine.test_cpu_decode import int8_dots
from tests.models.moe_gguf import write_moe_gguf
from tests.models.parity import flat_logits, random_prompts, sharpen_experts

CLASSES = {"Q8_0": Int8Linear, "Q4_0": Int4Linear}
MIXTRAL = dict(num_local_experts=8, num_experts_per_tok=2, rope_theta=1000000.0)
# every layer sparse (llama.cpp's files have no mlp_only_layers); widths on the 32-grid
QWEN2_MOE = dict(num_hidden_layers=2, num_experts=6, num_experts_per_tok=2,
                 moe_intermediate_size=32, shared_expert_intermediate_size=64,
                 mlp_only_layers=[], norm_topk_prob=False)
QWEN3_MOE = dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, head_dim=32,
                 norm_topk_prob=True, rope_theta=1000000.0)
FAMILIES = {"llama": ("mixtral", MIXTRAL), "qwen2moe": ("qwen2_moe", QWEN2_MOE),
            "qwen3moe": ("qwen3_moe", QWEN3_MOE)}


def moe_gguf(tmp_path, smollm2_path: str, arch: str, qtype: str,
             expert_qtype: str | None = None, **overrides) -> tuple[str, torch.nn.Module]:
    """A tiny random Mixtral (llama), Qwen2-MoE or Qwen3-MoE with sharp routing, written
    as a GGUF file with its matrices in `qtype` (experts in `expert_qtype`)."""
    family, base = FAMILIES[arch]
    path, ref = write_hf_checkpoint(tmp_path, family, **{**base, **overrides})
    # experts at their trained scale: scaled ones would amplify int8 activation rounding
    sharpen_experts(ref, path, experts=1.0)
    out = str(tmp_path / f"{arch}-{qtype}-{expert_qtype}.gguf")
    write_moe_gguf(out, ref, arch, GGUFFile(smollm2_path).metadata, qtype, expert_qtype)
    return out, ref


def sparse_blocks(net: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.mlp for layer in net.layers if hasattr(layer.mlp, "experts")]


CASES = [("llama", "Q8_0"), ("llama", "Q4_0"), ("qwen2moe", "Q4_0"), ("qwen2moe", "Q8_0"),
         ("qwen3moe", "Q4_0")]


@pytest.mark.parametrize("arch,qtype", CASES)
def test_quantized_experts_are_kept_in_their_blocks(tmp_path, smollm2_path, arch, qtype):
    """auto keeps every projection's blocks (experts, shared expert, attention, LM head)
    and holds the dequantizing loader's weights exactly; `none` dequantizes as before."""
    path, _ = moe_gguf(tmp_path, smollm2_path, arch, qtype)
    assert GGUFFile(path).tensors["blk.0.ffn_gate_exps.weight"].qtype.name == qtype
    native = load_model(path, quantization="auto").model  # the engine's default
    floats = load_model(path, quantization="none").model
    cls = CLASSES[qtype]
    for mine, theirs in zip(sparse_blocks(native), sparse_blocks(floats), strict=True):
        assert isinstance(theirs.experts, FusedExperts)
        assert isinstance(mine.experts, QuantExperts)
        assert isinstance(mine.gate, FloatLinear)
        for e in range(mine.experts.num_experts):
            gate_up, down = mine.experts.gate_up_proj[e], mine.experts.down_proj[e]
            assert isinstance(gate_up, cls) and isinstance(down, cls)
            assert torch.equal(gate_up.dequantize(), theirs.experts.gate_up_proj[e])
            assert torch.equal(down.dequantize(), theirs.experts.down_proj[e])
            # each expert owns its buffers: no view keeps a whole unpacked stack alive
            assert all(b.untyped_storage().nbytes() == b.numel() * b.element_size()
                       for b in [*gate_up.buffers(), *down.buffers()])
        if arch == "qwen2moe":
            assert isinstance(mine.shared_expert_gate, FloatLinear)
            for proj in ("gate_up_proj", "down_proj"):
                lin = getattr(mine.shared_expert, proj)
                assert isinstance(lin, cls)
                assert torch.equal(lin.dequantize(), getattr(theirs.shared_expert, proj).weight)
    for name in ("layers.0.self_attn.qkv_proj", "layers.1.self_attn.o_proj", "lm_head"):
        lin = native.get_submodule(name)
        assert isinstance(lin, QuantLinear), name
        # Mixtral's Q/K rows un-permuted as the float loader does
        assert torch.equal(lin.dequantize(), floats.get_submodule(name).weight), name


@pytest.mark.parametrize("arch,qtype", CASES)
def test_logits_equal_the_dequantized_model_to_int8_rounding(tmp_path, smollm2_path, arch,
                                                           qtype):
    """On float activations (the reference path) the block-served model is the float one;
    on the kernels' int8 activations its logits move as much as a dense model's do."""
    path, _ = moe_gguf(tmp_path, smollm2_path, arch, qtype)
    native = load_model(path, quantization="auto").model
    floats = load_model(path, quantization="none").model
    prompts = random_prompts([9, 27])
    want = flat_logits(floats, prompts)
    with int8_dots(False):
        torch.testing.assert_close(flat_logits(native, prompts), want, atol=1e-4, rtol=1e-4)
    got = flat_logits(native, prompts)
    bound = 0.02 * want.abs().amax()
    assert (got - want).abs().amax() <= bound
    # the same pick wherever the float model's top two are further apart than the bound
    # allows to swap (random tiny models have near-ties: Qwen3-MoE's here)
    top2 = want.topk(2).values
    clear = top2[:, 0] - top2[:, 1] > 2 * bound
    same = got.argmax(-1) == want.argmax(-1)
    assert bool(same[clear].all()) and same.float().mean() >= 0.9


def routed_logits(net: torch.nn.Module, seq: list[int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [T, V], expert ids [T, sparse layers, k]): the logits of `seq` and the
    sorted expert ids each sparse layer routed each token to."""
    picked: list[torch.Tensor] = []
    hooks = [mlp.gate.register_forward_hook(
        lambda mod, args, out, mlp=mlp: picked.append(
            route(out, mlp.top_k, mlp.renormalize)[1].sort(-1).values))
        for mlp in sparse_blocks(net)]
    try:
        out = flat_logits(net, [seq])
    finally:
        for h in hooks:
            h.remove()
    return out, torch.stack(picked, dim=1)


@pytest.mark.parametrize("arch,qtype", [("llama", "Q4_0"), ("qwen2moe", "Q8_0")])
def test_greedy_tokens_equal_the_dequantized_model(tmp_path, smollm2_path, arch, qtype):
    """The engine's greedy texts from the blocks and from the float weights are the same
    until a near-tie (random tiny models meet some: top-two margins of 2e-4 in 24 tokens).
    Teacher-forced on the float text, the block-served logits stay within the logits
    test's bound except where int8 activations flipped a router's near-tie (another
    expert ran), and pick the float token at >= 95% of positions, as the dense fused step
    is held to (tests/engine/test_cpu_decode.py)."""
    from peregrine import LLM, SamplingParams
    path, _ = moe_gguf(tmp_path, smollm2_path, arch, qtype)
    prompts = random_prompts([11, 5, 17], seed=3)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    texts = {}
    for quantization in ("auto", "none"):
        llm = LLM(path, quantization=quantization, num_kv_blocks=64, block_size=4)
        experts = llm.engine.runner.model.layers[0].mlp.experts
        assert isinstance(experts, QuantExperts if quantization == "auto" else FusedExperts)
        texts[quantization] = [o.outputs[0].token_ids for o in llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params)]
    native = load_model(path, quantization="auto").model
    floats = load_model(path, quantization="none").model
    same = 0
    for prompt, text, got in zip(prompts, texts["none"], texts["auto"], strict=True):
        seq, start = prompt + text[:-1], len(prompt) - 1
        want, want_routes = routed_logits(floats, seq)
        mine, my_routes = routed_logits(native, seq)
        bound = 0.02 * want.abs().amax()
        rerouted = (want_routes != my_routes).any(-1).any(-1)
        assert bool(((mine - want).abs().amax(-1) <= bound)[~rerouted].all())
        want, mine = want[start:], mine[start:]
        top2 = want.topk(2).values
        near_tie = top2[:, 0] - top2[:, 1] <= 2 * bound
        same += int((mine.argmax(-1) == want.argmax(-1)).sum())
        split = next((i for i, (a, b) in enumerate(zip(got, text)) if a != b), None)
        assert split is None or bool(near_tie[split]), (split, got, text)
    assert same >= 0.95 * len(prompts) * 24


def test_tied_router_resolves_as_transformers_does(tmp_path, smollm2_path):
    """Layer 0's router rows all equal (every probability ties): the block-served model
    routes through route() and picks transformers' experts, as the float one does."""
    path, ref = write_hf_checkpoint(tmp_path, "mixtral", **MIXTRAL)
    with torch.no_grad():
        gate = ref.model.layers[0].mlp.gate.weight
        gate.copy_(gate[:1].expand_as(gate) * 20)
    sharpen_experts(ref, path, router=1.0, experts=1.0)
    out = str(tmp_path / "tied.gguf")
    write_moe_gguf(out, ref, "llama", GGUFFile(smollm2_path).metadata, "Q8_0")
    prompts = random_prompts([7, 11])
    want = []
    hook = ref.model.layers[0].mlp.gate.register_forward_hook(
        lambda mod, args, o: want.append(o[2]))
    with torch.no_grad():
        for p in prompts:
            ref(torch.tensor([p]))
    hook.remove()
    net = load_model(out, quantization="auto").model
    assert isinstance(net.layers[0].mlp.experts, QuantExperts)
    got = []
    net.layers[0].mlp.gate.register_forward_hook(
        lambda mod, args, o: got.append(route(o, 2, True)[1]))
    flat_logits(net, prompts)
    assert torch.equal(got[0], torch.cat(want))


def test_float_experts_stay_float(tmp_path, smollm2_path, caplog):
    """Experts stored F16 cannot keep blocks: they load as today's float experts (logged),
    while the file's quantized attention and LM head keep theirs."""
    path, _ = moe_gguf(tmp_path, smollm2_path, "qwen2moe", "Q8_0", expert_qtype="F16")
    with caplog.at_level(logging.INFO, logger="peregrine"):
        net = load_model(path, quantization="gguf").model
    assert "layers.0.mlp.experts: not all in GGUF block types" in caplog.text
    assert "ffn_gate_exps F16" in caplog.text
    floats = load_model(path, quantization="none").model
    for mine, theirs in zip(sparse_blocks(net), sparse_blocks(floats), strict=True):
        assert isinstance(mine.experts, FusedExperts)
        assert torch.equal(mine.experts.gate_up_proj, theirs.experts.gate_up_proj)
        assert torch.equal(mine.experts.down_proj, theirs.experts.down_proj)
        assert isinstance(mine.shared_expert.gate_up_proj, Int8Linear)
    assert isinstance(net.layers[0].self_attn.qkv_proj, Int8Linear)
    assert isinstance(net.lm_head, Int8Linear)


def test_k_quant_experts_are_kept_in_their_blocks(tmp_path, smollm2_path):
    """Q4_K experts (rows of 256) keep their super-blocks' scales: int4 with int8 sub-block
    scales, the float loader's weights to rounding."""
    path, ref = write_hf_checkpoint(tmp_path, "mixtral", hidden_size=256,
                                    intermediate_size=256,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    num_local_experts=4, num_experts_per_tok=2)
    out = str(tmp_path / "q4_k.gguf")
    write_moe_gguf(out, ref, "llama", GGUFFile(smollm2_path).metadata, "Q8_0",
                   expert_qtype="Q4_K")
    assert GGUFFile(out).tensors["blk.1.ffn_down_exps.weight"].qtype.name == "Q4_K"
    native = load_model(out, quantization="auto").model
    floats = load_model(out, quantization="none").model
    for mine, theirs in zip(sparse_blocks(native), sparse_blocks(floats), strict=True):
        down = mine.experts.down_proj[3]
        assert isinstance(down, Int4Linear) and down.scale.dtype == torch.int8  # sc, as stored
        assert down.scale_super.dtype == torch.float32  # d
        torch.testing.assert_close(down.dequantize(), theirs.experts.down_proj[3],
                                   rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(mine.experts.gate_up_proj[1].dequantize(),
                                   theirs.experts.gate_up_proj[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("split", ["experts-split", "expert-parallel"])
def test_kept_experts_split_over_ranks(tmp_path, smollm2_path, split):
    """Tensor parallelism (every expert's columns, on its 32-weight groups) and expert
    parallelism (whole experts) take the file's QuantExperts and shared expert as they take
    --quantization's: two ranks compute the whole model's logits."""
    from peregrine.distributed.layout import expert_span
    from peregrine.distributed.sharding import shard_model
    from peregrine.layers.parallel_moe import ParallelMoE
    from tests.distributed.conftest import run_ranks
    path, _ = moe_gguf(tmp_path, smollm2_path, "qwen2moe", "Q4_0", moe_intermediate_size=64)
    # float64: the reference path of the quantized linears, where summation order is all a
    # split changes (int8 activations would be scaled per rank's columns)
    model = load_model(path, quantization="auto", dtype=torch.float64).model
    assert isinstance(model.layers[0].mlp.experts, QuantExperts)
    prompts = random_prompts([8, 3])
    want = flat_logits(model, prompts)

    def rank(layout, groups):
        from dataclasses import replace
        net = copy.deepcopy(model)
        shard_model(net, replace(layout, expert_parallel=split == "expert-parallel"), groups)
        moe = net.layers[0].mlp
        assert isinstance(moe, ParallelMoE) and isinstance(moe.moe.experts, QuantExperts)
        return flat_logits(net, prompts), moe.moe.experts.held

    results = run_ranks(2, 1, rank)
    torch.testing.assert_close(results[0][0], want, rtol=0, atol=1e-10)  # gathered there
    spans = [expert_span(6, 2, r) for r in range(2)] if split == "expert-parallel" else \
        [range(6)] * 2
    assert [held for _, held in results] == spans


def test_memory_model_counts_the_kept_experts(tmp_path, smollm2_path):
    """The estimate's plan (GGUF types of every expert) is every byte the loaded model
    holds."""
    path, _ = moe_gguf(tmp_path, smollm2_path, "qwen2moe", "Q4_0")
    loaded = load_model(path, quantization="gguf", max_model_len=256)
    plan = quantization_plan(loaded.config, "gguf", None,
                             gguf_module_types(loaded.gguf, loaded.config))
    assert plan["layers.0.mlp.experts.down_proj.5"].method == "int4"
    assert plan["layers.0.mlp.gate"].method == "float"
    assert weight_bytes(loaded.config, plan, torch.float32, 256).total == \
        held_weight_bytes(loaded.model)

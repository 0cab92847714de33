"""The sparse MoE block (layers/moe.py) against transformers' Mixtral and Qwen2-MoE blocks:
routing on tied router scores, the grouped expert path against a per-token loop, and
quantized experts against float."""

from __future__ import annotations

import pytest
import torch

from peregrine.layers.linear import Int4Linear, Int8Linear
from peregrine.layers.moe import QuantExperts, SparseMoE, grouped_experts, route
from peregrine.quantization.apply import QuantSpec, quantize_model
from tests.conftest import q8_activations

transformers = pytest.importorskip("transformers")

H, E = 32, 8


def hf_block(kind: str, top_k: int = 2, norm_topk_prob: bool = True):
    """transformers' sparse block of `kind` (mixtral | qwen2_moe) with random weights."""
    torch.manual_seed(0)
    if kind == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        cfg = transformers.MixtralConfig(hidden_size=H, intermediate_size=48,
                                         num_local_experts=E, num_experts_per_tok=top_k)
        block = MixtralSparseMoeBlock(cfg)
    else:
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
        cfg = transformers.Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=48,
                                          shared_expert_intermediate_size=40, num_experts=E,
                                          num_experts_per_tok=top_k,
                                          norm_topk_prob=norm_topk_prob)
        block = Qwen2MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block.eval()


def our_block(ref: torch.nn.Module, kind: str, top_k: int, renormalize: bool) -> SparseMoE:
    """Our SparseMoE holding `ref`'s weights."""
    from peregrine.models.llama import MLP
    shared = None
    if kind == "qwen2_moe":
        s = ref.shared_expert
        shared = MLP(H, s.gate_proj.out_features)
        shared.gate_up_proj.weight.data = torch.cat([s.gate_proj.weight, s.up_proj.weight])
        shared.down_proj.weight.data = s.down_proj.weight.data.clone()
    block = SparseMoE(H, E, top_k, 48, renormalize, shared_expert=shared)
    block.gate.weight.data = ref.gate.weight.data.clone()
    block.experts.gate_up_proj.data = ref.experts.gate_up_proj.data.clone()
    block.experts.down_proj.data = ref.experts.down_proj.data.clone()
    if shared is not None:
        block.shared_expert_gate.weight.data = ref.shared_expert_gate.weight.data.clone()
    return block


def tied_inputs(block: SparseMoE, ref: torch.nn.Module) -> torch.Tensor:
    """Hidden states whose router logits tie: x = one-hot rows, router columns set so
    row 0 ties experts 1, 2, 3 (top), row 1 ties all eight, row 2 ties 5 and 7 below 0."""
    cols = torch.tensor([[0., 1, 1, 1, 0, 0, 0, 0],
                         [1., 1, 1, 1, 1, 1, 1, 1],
                         [2., 1, 0, 0, 0, 3, 0, 3]])
    w = torch.randn(E, H) * 0.3
    w[:, :3] = cols.T
    block.gate.weight.data.copy_(w)
    ref.gate.weight.data.copy_(w)
    return torch.eye(H)[:3]


@pytest.mark.parametrize("kind,top_k,norm", [("mixtral", 2, True), ("qwen2_moe", 2, False),
                                             ("qwen2_moe", 3, True)])
def test_routing_matches_transformers_on_ties(kind, top_k, norm):
    ref = hf_block(kind, top_k, norm)
    block = our_block(ref, kind, top_k, norm)
    x = tied_inputs(block, ref)
    with torch.no_grad():
        _, want_w, want_ids = ref.gate(x)
    weights, ids = route(block.gate(x), top_k, norm)
    # the same experts in the same order (torch.topk's pick among tied ones), same weights
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w.float(), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref(x[None])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_block_matches_transformers(kind):
    """Random tokens (every expert used, some not): Mixtral's block, Qwen2-MoE's with its
    shared expert behind the sigmoid gate."""
    ref = hf_block(kind, 2, kind == "mixtral")
    block = our_block(ref, kind, 2, kind == "mixtral")
    x = torch.randn(2, 13, H)
    with torch.no_grad():
        want = ref(x)
    torch.testing.assert_close(block(x.view(-1, H)), want.view(-1, H), atol=1e-5, rtol=1e-5)


def per_token(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, expert) -> torch.Tensor:
    """The plain reference: each token through each of its experts, one at a time."""
    return torch.stack([sum(weights[t, j] * expert(int(ids[t, j]), x[t:t + 1])[0]
                            for j in range(ids.shape[1])) for t in range(x.shape[0])])


@pytest.mark.parametrize("tokens,top_k", [(1, 2), (9, 2), (6, 4)])
def test_grouped_experts_equal_a_per_token_loop(tokens, top_k):
    block = SparseMoE(H, E, top_k, 24, True)
    for p in block.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(tokens, H, dtype=torch.float64)
    block.double()
    weights, ids = route(block.gate(x), top_k, True)
    got = grouped_experts(x, weights, ids, E, block.experts.expert)
    want = per_token(x, weights.double(), ids, block.experts.expert)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_experts_run_the_quant_linears_and_stay_close(method):
    torch.manual_seed(0)
    block = SparseMoE(128, E, 2, 96, True)
    for p in block.parameters():
        p.data.normal_(0, 0.05)
    x = torch.randn(7, 128)
    want = block(x)
    quantize_model(block, QuantSpec(method, 32))
    assert isinstance(block.experts, QuantExperts)
    cls = Int8Linear if method == "int8" else Int4Linear
    assert all(isinstance(m, cls) for m in [*block.experts.gate_up_proj,
                                            *block.experts.down_proj])
    assert type(block.gate).__name__ == "FloatLinear"  # routing stays float
    got = block(x)
    # the CPU kernels' path equals the dequantized weights' torch reference (int4 runs on
    # int8 dot products: its activations are quantized per 32 values first)
    act = (lambda r: q8_activations(r)[0]) if method == "int4" else (lambda r: r)

    def expert(e: int, r: torch.Tensor) -> torch.Tensor:
        ex = block.experts
        h = ex.act_and_mul(ex.gate_up_proj[e].forward_reference(act(r)))
        return ex.down_proj[e].forward_reference(act(h))
    weights, ids = route(block.gate(x), 2, True)
    torch.testing.assert_close(got, per_token(x, weights, ids, expert), rtol=1e-3, atol=1e-5)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < (0.02 if method == "int8" else 0.15), rel

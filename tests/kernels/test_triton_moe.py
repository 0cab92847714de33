"""The Triton fused MoE (grouped GEMMs over rows sorted by expert) equals the torch path of
layers/moe.py; on CPU through Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from peregrine.kernels.triton.fused_moe import align_by_expert, fused_moe  # noqa: E402
from peregrine.layers.moe import FusedExperts, grouped_experts, route  # noqa: E402


def test_align_pads_each_expert_run_to_whole_blocks():
    ids = torch.tensor([[2, 0], [2, 3], [0, 2]])
    rows, block_expert = align_by_expert(ids, 4, 4)
    n = ids.numel()
    blocks = rows.view(-1, 4)
    # expert 1 has no rows, no block; the grid is sized for the worst padding
    assert block_expert.tolist() == [0, 2, 3, -1, -1, -1]
    for b, e in enumerate(block_expert.tolist()):
        real = [r for r in blocks[b].tolist() if r < n]
        assert all(ids.view(-1)[r] == e for r in real)
    assert sorted(r for r in rows.tolist() if r < n) == list(range(n))


@pytest.mark.parametrize("tokens,experts,top_k", [(1, 8, 2), (13, 4, 2), (6, 5, 3)])
def test_fused_moe_matches_torch_path(device, tokens, experts, top_k):
    g = torch.Generator().manual_seed(tokens)
    hidden, inter = 64, 48  # not multiples of the N tile: masked edges
    ex = FusedExperts(experts, hidden, inter)
    ex.gate_up_proj.data.normal_(0, 0.1, generator=g)
    ex.down_proj.data.normal_(0, 0.1, generator=g)
    x = torch.randn(tokens, hidden, generator=g)
    logits = torch.randn(tokens, experts, generator=g)
    logits[:, 0] = -30.0  # expert 0 gets no tokens
    weights, ids = route(logits, top_k, True)
    want = grouped_experts(x, weights, ids, experts, ex.expert)
    ex = ex.to(device)
    got = fused_moe(x.to(device), ex.gate_up_proj, ex.down_proj, weights.to(device),
                    ids.to(device))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)

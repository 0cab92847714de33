"""Mixture-of-experts blocks split across ranks, made from a loaded block's own experts.

Two splits (vLLM's): tensor-parallel experts keep every expert's columns [start, end) of
its intermediate width (gate and up rows, down columns, as a dense MLP splits); expert
parallelism keeps whole experts, a contiguous run of router ids. Either way each rank's
block computes a partial sum of the output (its columns, or its experts' (token, slot)
pairs), the shared expert's partial sum joins it, and `ParallelMoE` all-reduces once. The
router is replicated: every rank routes every token the same way."""

from __future__ import annotations

import torch
from torch import nn

from peregrine.layers.comm import ParallelGroup
from peregrine.layers.moe import FusedExperts, QuantExperts, SparseMoE
from peregrine.layers.parallel_linear import ParallelModule, slice_columns, slice_rows

Experts = FusedExperts | QuantExperts


def _fused_like(experts: FusedExperts, gate_up: torch.Tensor, down: torch.Tensor,
                held: range) -> FusedExperts:
    with torch.device("meta"):  # no throw-away allocation of the full stack
        out = FusedExperts(experts.num_experts, down.shape[1], down.shape[2], experts.act,
                           held)
    out.gate_up_proj = nn.Parameter(gate_up.contiguous(), requires_grad=False)
    out.down_proj = nn.Parameter(down.contiguous(), requires_grad=False)
    return out


def slice_expert_columns(experts: Experts, start: int, end: int, name: str) -> Experts:
    """Every expert's intermediate columns [start, end): gate and up rows, down columns
    (quantized down projections split on their groups: ValueError naming `name`)."""
    if isinstance(experts, FusedExperts):
        inter = experts.down_proj.shape[2]
        rows = torch.cat([torch.arange(start, end), torch.arange(inter + start, inter + end)])
        return _fused_like(experts, experts.gate_up_proj.data[:, rows],
                           experts.down_proj.data[:, :, start:end], experts.held)
    inter = experts.down_proj[0].in_features
    rows = torch.cat([torch.arange(start, end), torch.arange(inter + start, inter + end)])
    gate_up, down = [], []
    for i, (gu, d) in enumerate(zip(experts.gate_up_proj, experts.down_proj)):
        gate_up.append(slice_rows(gu, rows))
        try:
            down.append(slice_columns(d, start, end))
        except ValueError as e:
            raise ValueError(f"{name}.down_proj.{experts.held[i]}: {e}") from None
    return QuantExperts(gate_up, down, experts.act, experts.num_experts, experts.held)


def keep_experts(experts: Experts, held: range) -> Experts:
    """Only the whole experts `held` (router ids within the block's own)."""
    if held.start < experts.held.start or held.stop > experts.held.stop:
        raise ValueError(f"experts {held} are not all in this block's {experts.held}")
    local = slice(held.start - experts.held.start, held.stop - experts.held.start)
    if isinstance(experts, FusedExperts):
        return _fused_like(experts, experts.gate_up_proj.data[local],
                           experts.down_proj.data[local], held)
    return QuantExperts(list(experts.gate_up_proj[local]), list(experts.down_proj[local]),
                        experts.act, experts.num_experts, held)


class ParallelMoE(ParallelModule):
    """A sparse block whose experts (and shared expert) hold this rank's part: its partial
    output, all-reduced once over the group."""

    def __init__(self, moe: SparseMoE, group: ParallelGroup) -> None:
        super().__init__()
        self.moe = moe
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(self.moe(x))

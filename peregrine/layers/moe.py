"""The sparse mixture-of-experts block of Mixtral, Qwen2-MoE and Qwen3-MoE.

A router scores every expert for each token; the token goes through its top-k experts
(gated SwiGLU MLPs) and their outputs are summed, weighted by the router's probabilities.
The experts run grouped, not per token: the (token, slot) pairs are sorted by expert id,
each expert multiplies the contiguous rows routed to it in one matmul, and the rows are
put back in (token, slot) order and summed with their weights. On CUDA the float experts
run as two Triton grouped GEMMs (kernels/triton/fused_moe.py); quantized experts
(`--quantization`, or a GGUF file's own blocks: models/gguf_native.py) are one
QuantLinear per expert projection, so they run on the same kernels as every other
quantized linear. Under expert parallelism a block holds only some experts (`held`) and
computes only the pairs routed to them (layers/parallel_moe.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from peregrine.layers.activation import GATED_ACTIVATIONS
from peregrine.layers.linear import QuantLinear

# (expert id, its rows [n, hidden]) -> its output [n, hidden]
ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]


def route(logits: torch.Tensor, top_k: int, renormalize: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k]) from router logits [T, E], as
    transformers routes: softmax over all experts in float32, torch.topk of the
    probabilities (so tied experts resolve as topk resolves them), and the k weights
    rescaled to sum to 1 when `renormalize` (Mixtral, `norm_topk_prob`)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def group_by_expert(ids: torch.Tensor, num_experts: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, counts): the flat (token, slot) indices of `ids` [T, k] sorted by expert id
    (stable: tokens in order within an expert), and how many rows each expert gets [E]."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return order, torch.bincount(flat, minlength=num_experts)


def grouped_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                    num_experts: int, expert: ExpertFn, held: range | None = None
                    ) -> torch.Tensor:
    """sum_j weights[t, j] * expert(ids[t, j], x[t]) for every token t of x [T, hidden],
    with each expert called once on all its rows (the torch path of the fused MoE).

    `held` (default: all `num_experts`) are the expert ids this process computes; the
    (token, slot) pairs routed elsewhere add nothing here (expert parallelism: another
    rank adds them, and an all-reduce sums the ranks)."""
    held = range(num_experts) if held is None else held
    num_tokens, top_k = ids.shape
    if num_tokens == 1:  # one decoding sequence: nothing to group, its k experts in turn
        slots = [(j, e) for j, e in enumerate(ids[0].tolist()) if e in held]
        if not slots:
            return torch.zeros_like(x)
        out = torch.cat([expert(e, x) for _, e in slots])
        w = weights[0, [j for j, _ in slots]]
        return (out * w.unsqueeze(-1)).sum(dim=0, keepdim=True).to(x.dtype)
    order, counts = group_by_expert(ids, num_experts)
    counts = counts.tolist()
    first = sum(counts[:held.start])  # held experts' rows are contiguous in sorted order
    last = first + sum(counts[held.start:held.stop])
    mine = order[first:last]
    rows = x[mine // top_k]  # the tokens, sorted by the expert they go to
    out = torch.empty_like(rows)
    start = 0
    for e in held:
        n = counts[e]
        if n:
            out[start:start + n] = expert(e, rows[start:start + n])
            start += n
    if len(mine) == len(order):
        unsorted = torch.empty_like(out)
    else:
        unsorted = x.new_zeros(len(order), x.shape[-1])
    unsorted[mine] = out  # back to (token, slot) order
    per_slot = unsorted.view(num_tokens, top_k, -1) * weights.unsqueeze(-1)
    return per_slot.sum(dim=1).to(x.dtype)


class FloatLinear(nn.Module):
    """y = x W^T in the compute dtype, never quantized: the router's and the shared expert
    gate's logits choose and scale experts, and a few thousand weights are not worth the
    error."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class FusedExperts(nn.Module):
    """`num_experts` gated MLPs with their weights stacked as transformers 5 stores them:
    gate_up_proj [E, 2I, hidden] (gate rows, then up rows) and down_proj [E, hidden, I].
    Under expert parallelism the module holds only experts `held` (stacked in that order)
    of the `num_experts` the router chooses from."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 act: str = "silu", held: range | None = None) -> None:
        super().__init__()
        self.num_experts, self.act = num_experts, act
        self.held = range(num_experts) if held is None else held
        self.gate_up_proj = nn.Parameter(
            torch.empty(len(self.held), 2 * intermediate_size, hidden_size),
            requires_grad=False)
        self.down_proj = nn.Parameter(
            torch.empty(len(self.held), hidden_size, intermediate_size), requires_grad=False)
        self.act_and_mul = GATED_ACTIVATIONS[act]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `e` (a router id) on its rows x [n, hidden]."""
        i = e - self.held.start
        return F.linear(self.act_and_mul(F.linear(x, self.gate_up_proj[i])), self.down_proj[i])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                ) -> torch.Tensor:
        # the Triton kernel indexes experts by router id: it needs all of them
        if x.is_cuda and self.act == "silu" and len(self.held) == self.num_experts:
            from peregrine.kernels.triton.fused_moe import fused_moe
            return fused_moe(x, self.gate_up_proj, self.down_proj, weights, ids)
        return grouped_experts(x, weights, ids, self.num_experts, self.expert, self.held)


class QuantExperts(nn.Module):
    """The same experts with each projection a quantized linear: gate_up_proj[e] and
    down_proj[e] run on the QuantLinear kernels (int4/int8 dot products on CPUs). `held`
    as for FusedExperts (all of them unless given)."""

    def __init__(self, gate_up: list[QuantLinear], down: list[QuantLinear],
                 act: str = "silu", num_experts: int | None = None,
                 held: range | None = None) -> None:
        super().__init__()
        self.num_experts = len(gate_up) if num_experts is None else num_experts
        self.act = act
        self.held = range(len(gate_up)) if held is None else held
        if len(self.held) != len(gate_up):
            raise ValueError(f"{len(gate_up)} experts given for the {len(self.held)} held")
        self.gate_up_proj = nn.ModuleList(gate_up)
        self.down_proj = nn.ModuleList(down)
        self.act_and_mul = GATED_ACTIVATIONS[act]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `e` (a router id) on its rows x [n, hidden]."""
        i = e - self.held.start
        return self.down_proj[i](self.act_and_mul(self.gate_up_proj[i](x)))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                ) -> torch.Tensor:
        return grouped_experts(x, weights, ids, self.num_experts, self.expert, self.held)


class SparseMoE(nn.Module):
    """Router, routed experts and (Qwen2-MoE) a shared expert every token goes through,
    scaled by a sigmoid gate."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int,
                 intermediate_size: int, renormalize: bool, act: str = "silu",
                 shared_expert: nn.Module | None = None) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = FloatLinear(hidden_size, num_experts)
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size, act)
        self.shared_expert = shared_expert
        self.shared_expert_gate = (None if shared_expert is None
                                   else FloatLinear(hidden_size, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

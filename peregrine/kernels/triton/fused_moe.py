"""Triton fused mixture-of-experts for the GPU: grouped GEMMs over rows sorted by expert.

The (token, slot) rows a router produced are sorted by expert and each expert's run is
padded to a multiple of BLOCK_M, so every block of rows belongs to one expert. A program
multiplies one block by one tile of its expert's weight (stacked [E, N, K]); padding rows
are masked. Two launches make the experts' MLP: gate_up (then silu(gate) * up), and down,
which scales each row by its router weight before storing it; the k slots of a token are
summed last. Everything is computed without a host sync (the grid is sized for the worst
padding, and blocks past the last expert return at once). Tested on CPU with
TRITON_INTERPRET=1 against layers/moe.py's torch path."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _grouped_gemm(a_ptr, b_ptr, c_ptr, w_ptr, rows_ptr, block_expert_ptr, N, K, num_rows,
                  a_row_div, MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c[row] = a[row // a_row_div] @ b[expert]^T (times w[row]) for one block of rows."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:  # a block past the last expert's padded run
        return
    rows = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = rows < num_rows  # padding rows hold num_rows
    a_rows = rows // a_row_div
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b_base = b_ptr + expert * N * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + a_rows[:, None] * K + rk[None, :],
                    mask=valid[:, None] & (rk[None, :] < K), other=0.0)
        b = tl.load(b_base + rn[None, :] * K + rk[:, None],
                    mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc += tl.dot(a, b, input_precision="ieee")
    if MUL_WEIGHT:
        acc = acc * tl.load(w_ptr + rows, mask=valid, other=0.0)[:, None]
    tl.store(c_ptr + rows[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=valid[:, None] & (rn[None, :] < N))


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, block_expert): the flat (token, slot) indices of `ids` [T, k] sorted by expert,
    each expert's run padded with T*k to a multiple of `block_m`, sized for the worst case;
    and the expert of each block of `block_m` rows (-1 past the last one)."""
    flat = ids.reshape(-1)
    n = flat.numel()
    order = torch.argsort(flat, stable=True)
    # not bincount: on CUDA it reads the largest id back to the host
    counts = torch.zeros(num_experts, dtype=torch.long, device=ids.device).index_add_(
        0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    sorted_experts = flat[order]
    # rank within its expert's run, moved to the start of that expert's padded run
    dest = (torch.cumsum(padded, 0) - padded)[sorted_experts] + (
        torch.arange(n, device=ids.device) - (torch.cumsum(counts, 0) - counts)[sorted_experts])
    max_blocks = triton.cdiv(n, block_m) + num_experts
    rows = torch.full((max_blocks * block_m,), n, dtype=torch.int32, device=ids.device)
    rows[dest] = order.to(torch.int32)
    block_end = torch.cumsum(padded // block_m, 0)
    block_expert = torch.searchsorted(block_end, torch.arange(max_blocks, device=ids.device),
                                      right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return rows, block_expert


def _launch(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, weights: torch.Tensor,
            rows: torch.Tensor, block_expert: torch.Tensor, a_row_div: int, mul_weight: bool,
            block_m: int, block_n: int, block_k: int) -> None:
    num_experts, n, k = b.shape
    grid = (block_expert.numel(), triton.cdiv(n, block_n))
    _grouped_gemm[grid](a, b, out, weights, rows, block_expert, n, k, out.shape[0], a_row_div,
                        MUL_WEIGHT=mul_weight, BLOCK_M=block_m, BLOCK_N=block_n,
                        BLOCK_K=block_k)


def fused_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
              weights: torch.Tensor, ids: torch.Tensor, block_m: int = 16, block_n: int = 64,
              block_k: int = 32) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) for x [T, hidden], with SwiGLU
    experts gate_up [E, 2I, hidden] (gate rows first) and down [E, hidden, I]."""
    x = x.contiguous()
    num_tokens, hidden = x.shape
    top_k = ids.shape[1]
    rows, block_expert = align_by_expert(ids, gate_up.shape[0], block_m)
    blocks = (block_m, block_n, block_k)
    h = torch.empty(num_tokens * top_k, gate_up.shape[1], dtype=x.dtype, device=x.device)
    w = weights.reshape(-1).float().contiguous()
    _launch(x, gate_up.contiguous(), h, w, rows, block_expert, top_k, False, *blocks)
    gate, up = h.chunk(2, dim=-1)
    act = (torch.nn.functional.silu(gate) * up).contiguous()
    out = torch.empty(num_tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    _launch(act, down.contiguous(), out, w, rows, block_expert, 1, True, *blocks)
    return out.view(num_tokens, top_k, hidden).sum(dim=1)

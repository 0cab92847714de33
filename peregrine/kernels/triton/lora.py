"""Segmented LoRA kernels for the GPU (punica's SGMV): a step's rows that use adapters,
sorted by adapter slot, are cut into segments of one slot each; `lora_shrink` computes
h = x A_s^T and `lora_expand` adds h B_s^T to the output's columns of one slice, every
program reading its segment's slot (and rank) from the segment table.

Layouts (peregrine/layers/lora.py): A [slots, n_slices * R, in], slot s packing slice j's
A at rows j*r_s .. (j+1)*r_s; B^T of slice j [slots, R, out_j] (scaling folded in),
rows 0 .. r_s. Tested against the torch path on CPU with TRITON_INTERPRET=1."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _segment_tile(rows_ptr, seg_start_ptr, seg_slot_ptr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """This program's tile: its segment's slot, positions rm in the sorted rows (masked by
    the segment's end), output columns rn, and the batch row of each position."""
    g = tl.program_id(0)
    start = tl.load(seg_start_ptr + g)
    end = tl.load(seg_start_ptr + g + 1)
    slot = tl.load(seg_slot_ptr + g)
    rm = start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < end
    tok = tl.load(rows_ptr + rm, mask=mmask, other=0)
    return slot, rm, rn, mmask, tok


@triton.jit
def _shrink(x_ptr, a_ptr, h_ptr, rows_ptr, seg_start_ptr, seg_slot_ptr, rank_ptr,
            K, NR, A_SLOT_STRIDE, NSLICES: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    slot, rm, rn, mmask, tok = _segment_tile(rows_ptr, seg_start_ptr, seg_slot_ptr, BLOCK_M,
                                             BLOCK_N)
    nmask = rn < NSLICES * tl.load(rank_ptr + slot)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        x = tl.load(x_ptr + tok[:, None] * K + rk[None, :], mask=mmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        a = tl.load(a_ptr + slot * A_SLOT_STRIDE + rn[None, :] * K + rk[:, None],
                    mask=nmask[None, :] & kmask[:, None], other=0.0).to(tl.float32)
        acc += tl.dot(x, a, input_precision="ieee")
    tl.store(h_ptr + rm[:, None] * NR + rn[None, :], acc,
             mask=mmask[:, None] & (rn < NR)[None, :])


@triton.jit
def _expand(h_ptr, bt_ptr, y_ptr, rows_ptr, seg_start_ptr, seg_slot_ptr, rank_ptr,
            NR, R_MAX, N_OUT, OUT_OFF, Y_STRIDE, B_SLOT_STRIDE, SLICE: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    slot, rm, rn, mmask, tok = _segment_tile(rows_ptr, seg_start_ptr, seg_slot_ptr, BLOCK_M,
                                             BLOCK_N)
    r = tl.load(rank_ptr + slot)
    nmask = rn < N_OUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, R_MAX, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < r
        h = tl.load(h_ptr + rm[:, None] * NR + SLICE * r + rk[None, :],
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(bt_ptr + slot * B_SLOT_STRIDE + rk[:, None] * N_OUT + rn[None, :],
                    mask=kmask[:, None] & nmask[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(h, b, input_precision="ieee")
    # Each (row, column) belongs to one program: a plain read-add-write, no atomics.
    mask = mmask[:, None] & nmask[None, :]
    out = y_ptr + tok[:, None] * Y_STRIDE + OUT_OFF + rn[None, :]
    old = tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, (old + acc).to(y_ptr.dtype.element_ty), mask=mask)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, rows: torch.Tensor, seg_start: torch.Tensor,
                seg_slot: torch.Tensor, ranks: torch.Tensor, max_seg_len: int, n_slices: int,
                block_m: int = 16, block_n: int = 32, block_k: int = 32) -> torch.Tensor:
    """h [len(rows), n_slices * R] float32: row i is x[rows[i]] A_s^T for its segment's
    slot s (columns past n_slices * r_s are zero)."""
    x = x.contiguous()
    nr = a.shape[1]
    h = torch.empty(rows.shape[0], nr, dtype=torch.float32, device=x.device)
    grid = (seg_slot.shape[0], triton.cdiv(max_seg_len, block_m), triton.cdiv(nr, block_n))
    _shrink[grid](x, a, h, rows, seg_start, seg_slot, ranks, x.shape[1], nr, a.stride(0),
                  NSLICES=n_slices, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return h


def lora_expand(h: torch.Tensor, bt: torch.Tensor, y: torch.Tensor, out_offset: int,
                slice_index: int, rows: torch.Tensor, seg_start: torch.Tensor,
                seg_slot: torch.Tensor, ranks: torch.Tensor, max_seg_len: int,
                block_m: int = 16, block_n: int = 64, block_k: int = 16) -> None:
    """y[rows[i], out_offset : out_offset + out_j] += h[i, j*r_s : (j+1)*r_s] B^T (slice j of
    its slot s), in place; y is a contiguous [T, out] matrix."""
    assert y.is_contiguous() and h.is_contiguous()
    n_out = bt.shape[2]
    grid = (seg_slot.shape[0], triton.cdiv(max_seg_len, block_m), triton.cdiv(n_out, block_n))
    _expand[grid](h, bt, y, rows, seg_start, seg_slot, ranks, h.shape[1], bt.shape[1], n_out,
                  out_offset, y.stride(0), bt.stride(0), SLICE=slice_index, BLOCK_M=block_m,
                  BLOCK_N=block_n, BLOCK_K=block_k)

"""Paged decode attention (one query token per sequence), flash-decoding style.

Grid (sequence, kv head, split). A program loads the G = Hq / Hkv query heads that share
its kv head as one [G, D] tile, so every K/V tile is read once per group, and walks the
keys of its split of the sequence through the block table. A decode is memory-bound and a
batch of few sequences gives few (sequence, kv head) pairs, so long contexts are split
across programs: each writes a partial output and its log-sum-exp, and a second small
kernel merges the splits. With a single split the first kernel writes the output itself.

The split size is a launch argument, not derived from the sequence lengths on the device:
a CUDA graph captured with the largest lengths stays valid for any shorter batch (splits
past a sequence's end exit at once and contribute nothing)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from peregrine.kernels.triton.paged import (acc_dtype, dot_precision, load_kv_tiles,
                                            quant_mode, softmax_step)


@dataclass(frozen=True)
class DecodeTiles:
    """Tile sizes of the decode kernels and how finely long contexts are split."""

    block_n: int = 64  # keys per inner-loop tile
    target_programs: int = 528  # aim for ~4 programs per SM of an H100 (132 SMs)
    num_warps: int = 4


def split_plan(num_seqs: int, num_kv_heads: int, max_seq_len: int, tiles: DecodeTiles
               ) -> tuple[int, int]:
    """(partition size in tokens, number of splits) for a batch whose longest sequence has
    `max_seq_len` tokens: enough splits to give ~target_programs programs in all, each split
    a whole number of key tiles."""
    wanted = max(1, -(-tiles.target_programs // max(1, num_seqs * num_kv_heads)))
    per_split = -(-max(max_seq_len, 1) // wanted)
    partition = -(-per_split // tiles.block_n) * tiles.block_n
    return partition, -(-max(max_seq_len, 1) // partition)


@triton.jit
def _decode_split_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr,
        seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
        scale, softcap, window, partition_size, num_splits,
        H_KV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        QUANT: tl.constexpr, USE_WINDOW: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
        PRECISION: tl.constexpr, ACC: tl.constexpr, SOFTCAP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    start = split * partition_size
    end = tl.minimum(start + partition_size, seq_len)
    lo = start
    if USE_WINDOW:  # the query sits at seq_len - 1 and sees keys j > seq_len - 1 - window
        lo = tl.maximum(start, seq_len - window)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < G
    d_mask = offs_d < D
    heads = kv_head * G + offs_g
    q = tl.load(q_ptr + b * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], -1e30, dtype=ACC)
    l_i = tl.full([BLOCK_G], 0.0, dtype=ACC)
    acc = tl.full([BLOCK_G, BLOCK_D], 0.0, dtype=ACC)
    table_row = block_tables_ptr + b * stride_bt
    for j0 in range(lo, end, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)
        valid = offs_n < end
        k, v = load_kv_tiles(k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table_row,
                             offs_n, valid, kv_head, offs_d, d_mask, H_KV, D, BLOCK_SIZE, QUANT,
                             q.dtype)
        acc, m_i, l_i = softmax_step(acc, m_i, l_i, q, k, v, valid[None, :], scale, softcap,
                                     PRECISION, ACC, SOFTCAP)

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    mask = g_mask[:, None] & d_mask[None, :]
    if SINGLE_SPLIT:
        tl.store(out_ptr + b * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        row = (b * (H_KV * G) + heads) * num_splits + split
        tl.store(part_out_ptr + row[:, None] * D + offs_d[None, :], out, mask=mask)
        lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g_mask)


@triton.jit
def _decode_merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, stride_ot, stride_oh, num_splits,
                         HQ: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < D
    rows = (b * HQ + h) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + rows, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no keys at all (a padded row): output 0
    w = tl.exp(lse - m)
    parts = tl.load(part_out_ptr + rows[:, None] * D + offs_d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    den = tl.sum(w, 0)
    out = tl.sum(w[:, None] * parts, 0) / tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + b * stride_ot + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=d_mask)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor,
                           scale: float, sliding_window: int | None, max_seq_len: int,
                           tiles: DecodeTiles = DecodeTiles(), softcap: float | None = None
                           ) -> None:
    """out[b] = attention of q[b] [Hq, D] over the first seq_lens[b] cached tokens of
    sequence b (paged through block_tables[b]). `max_seq_len` bounds seq_lens on the host
    (it sizes the split plan; no device value is read). A sequence of length 0 gets 0.
    `softcap`: scaled scores s become softcap * tanh(s / softcap) before the softmax."""
    b, hq, d = q.shape
    if b == 0:
        return
    hkv, block_size = k_cache.shape[2], k_cache.shape[1]
    assert q.stride(-1) == 1 and out.stride(-1) == 1 and block_tables.stride(-1) == 1
    partition, num_splits = split_plan(b, hkv, max_seq_len, tiles)
    quant = quant_mode(k_cache.dtype)
    single = num_splits == 1
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if single:
        part_out = part_lse = out  # unused
    else:
        part_out = torch.empty((b, hq, num_splits, d), dtype=acc, device=q.device)
        part_lse = torch.empty((b, hq, num_splits), dtype=acc, device=q.device)
    _decode_split_kernel[(b, hkv, num_splits)](
        q, k_cache, v_cache, k_scale if quant else k_cache, v_scale if quant else v_cache,
        block_tables, seq_lens, out, part_out, part_lse,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        scale, softcap or 1.0, sliding_window or 0, partition, num_splits,
        H_KV=hkv, G=hq // hkv, D=d, BLOCK_SIZE=block_size,
        BLOCK_G=max(16, triton.next_power_of_2(hq // hkv)), BLOCK_D=triton.next_power_of_2(d),
        BLOCK_N=tiles.block_n, QUANT=quant, USE_WINDOW=sliding_window is not None,
        SINGLE_SPLIT=single, PRECISION=dot_precision(q.dtype), ACC=acc_dtype(q.dtype),
        SOFTCAP=softcap is not None, num_warps=tiles.num_warps)
    if not single:
        _decode_merge_kernel[(b, hq)](
            part_out, part_lse, out, out.stride(0), out.stride(1), num_splits,
            HQ=hq, D=d, BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=triton.next_power_of_2(d), num_warps=1 if d <= 64 else 2)

"""Prefill / chunked-prefill attention over the paged cache (causal, varlen, online softmax).

Grid (query tile, sequence, kv head). A program's rows are BLOCK_Q consecutive query
tokens times the G query heads sharing its kv head (row r = token r // G, head r % G), so
each K/V tile is loaded once for the whole group. A chunk's queries attend to two ranges
of keys: the cached context before the chunk (read through the block table, dequantized
when the cache is int8/fp8) and the chunk's own fresh K/V (read straight from k/v, which
is also the whole story when there is no cache). Only the key tiles that some row of the
query tile can see are visited: up to the tile's last position, and from its first
position's window start with a sliding window."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from peregrine.kernels.triton.paged import (acc_dtype, dot_precision, load_kv_tiles,
                                            quant_mode, softmax_step)


@dataclass(frozen=True)
class PrefillTiles:
    """Tile sizes of the prefill kernel."""

    block_m: int = 64  # query rows (tokens x grouped heads) per program
    block_n: int = 64  # keys per inner-loop tile
    num_warps: int = 4
    num_stages: int = 2


@triton.jit
def _prefill_kernel(
        q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
        block_tables_ptr, query_start_ptr, seq_lens_ptr, out_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_ot, stride_oh, stride_bt, scale, softcap, window, first_seq,
        H_KV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, PAGED: tl.constexpr, QUANT: tl.constexpr,
        USE_WINDOW: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
        SOFTCAP: tl.constexpr):
    tile = tl.program_id(0)
    seq = (first_seq + tl.program_id(1)).to(tl.int64)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq).to(tl.int64)
    n = (tl.load(query_start_ptr + seq + 1) - q_start).to(tl.int32)
    t0 = tile * BLOCK_Q
    if t0 >= n:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - n  # tokens already in the cache before this chunk

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    tok = t0 + offs_m // G
    heads = kv_head * G + offs_m % G
    row_valid = (offs_m < BLOCK_Q * G) & (tok < n)
    pos = context + tok
    q_rows = q_start + tok
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_valid[:, None] & d_mask[None, :], other=0.0)

    hi = tl.minimum(seq_len, context + t0 + BLOCK_Q)  # one past the tile's last position
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(0, context + t0 - window + 1)

    m_i = tl.full([BLOCK_M], -1e30, dtype=ACC)
    l_i = tl.full([BLOCK_M], 0.0, dtype=ACC)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=ACC)
    if PAGED:  # the cached context [lo, context)
        table_row = block_tables_ptr + seq * stride_bt
        for j0 in range(lo, tl.minimum(context, hi), BLOCK_N):
            offs_n = j0 + tl.arange(0, BLOCK_N)
            valid = offs_n < context
            k, v = load_kv_tiles(k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table_row,
                                 offs_n, valid, kv_head, offs_d, d_mask, H_KV, D, BLOCK_SIZE,
                                 QUANT, q.dtype)
            visible = valid[None, :] & row_valid[:, None]
            if USE_WINDOW:
                visible &= offs_n[None, :] > pos[:, None] - window
            acc, m_i, l_i = softmax_step(acc, m_i, l_i, q, k, v, visible, scale, softcap,
                                         PRECISION, ACC, SOFTCAP)
    # the chunk itself [max(lo, context), hi): fresh K/V rows q_start + (j - context)
    for j0 in range(tl.maximum(lo, context), hi, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)
        valid = offs_n < hi
        rows = q_start + (offs_n - context)
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + rows[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(v_ptr + rows[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(q.dtype)
        visible = valid[None, :] & row_valid[:, None] & (offs_n[None, :] <= pos[:, None])
        if USE_WINDOW:
            visible &= offs_n[None, :] > pos[:, None] - window
        acc, m_i, l_i = softmax_step(acc, m_i, l_i, q, k, v, visible, scale, softcap,
                                     PRECISION, ACC, SOFTCAP)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                      k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                      block_tables: torch.Tensor | None, query_start_loc: torch.Tensor,
                      seq_lens: torch.Tensor, out: torch.Tensor, first_seq: int, num_seqs: int,
                      max_query_len: int, scale: float, sliding_window: int | None,
                      tiles: PrefillTiles = PrefillTiles(), softcap: float | None = None
                      ) -> None:
    """Causal attention for sequences first_seq .. first_seq + num_seqs - 1 of a flat batch:
    each one's queries q[query_start_loc[i]:query_start_loc[i+1]] attend to its cached
    context (seq_lens[i] minus its query length, paged; none without a cache) and to
    themselves (k/v of the same rows). `max_query_len` bounds their query lengths (host).
    `softcap`: scaled scores s become softcap * tanh(s / softcap) before the mask."""
    if num_seqs == 0 or max_query_len == 0:
        return
    hq, d = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    g = hq // hkv
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == out.stride(-1) == 1
    block_q = max(1, tiles.block_m // g)
    block_m = max(16, triton.next_power_of_2(block_q * g))
    paged = k_cache is not None
    quant = quant_mode(k_cache.dtype) if paged else 0
    k_cache = k_cache if paged else k  # unused pointers when there is no cache
    v_cache = v_cache if paged else v
    table = block_tables if paged else query_start_loc
    grid = (triton.cdiv(max_query_len, block_q), num_seqs, hkv)
    _prefill_kernel[grid](
        q, k, v, k_cache, v_cache, k_scale if quant else k_cache, v_scale if quant else v_cache,
        table, query_start_loc, seq_lens, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), table.stride(0), scale, softcap or 1.0,
        sliding_window or 0, first_seq,
        H_KV=hkv, G=g, D=d, BLOCK_SIZE=k_cache.shape[1] if paged else 1,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_D=triton.next_power_of_2(d),
        BLOCK_N=tiles.block_n, PAGED=paged, QUANT=quant, USE_WINDOW=sliding_window is not None,
        PRECISION=dot_precision(q.dtype), ACC=acc_dtype(q.dtype), SOFTCAP=softcap is not None,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)

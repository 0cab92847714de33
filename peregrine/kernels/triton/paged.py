"""Device helpers shared by the paged attention kernels: loading K/V tiles through a block
table (dequantized when the cache holds int8/fp8) and one online-softmax step.

Helpers are few and coarse on purpose: Triton's CPU interpreter pays milliseconds per
nested call, and CI runs every kernel under it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

QUANT_NONE, QUANT_INT8, QUANT_FP8 = 0, 1, 2


def quant_mode(cache_dtype: torch.dtype) -> int:
    """How a cache of `cache_dtype` stores values: as is, int8 or fp8 (e4m3fn), with scales."""
    if cache_dtype == torch.int8:
        return QUANT_INT8
    if cache_dtype == torch.float8_e4m3fn:
        return QUANT_FP8
    return QUANT_NONE


def dot_precision(dtype: torch.dtype) -> str:
    """`ieee` for float32/float64 inputs (tl.dot would use tf32 on the GPU otherwise)."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """Softmax statistics and accumulators: float64 for float64 inputs, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def load_kv_tiles(k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table_row_ptr, offs_n,
                  valid, kv_head, offs_d, d_mask, H_KV: tl.constexpr, D: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, QUANT: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """K and V [BLOCK_N, BLOCK_D] of one kv head at token positions `offs_n` of a sequence
    (paged through its block-table row), dequantized, in OUT_DTYPE; zeros where not valid."""
    block = tl.load(table_row_ptr + offs_n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    slots = block * BLOCK_SIZE + offs_n % BLOCK_SIZE
    offs = slots[:, None] * (H_KV * D) + kv_head * D + offs_d[None, :]
    mask = valid[:, None] & d_mask[None, :]
    k = tl.load(k_cache_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_cache_ptr + offs, mask=mask, other=0.0)
    if QUANT != 0:
        k_scale = tl.load(k_scale_ptr + slots * H_KV + kv_head, mask=valid, other=0.0)
        v_scale = tl.load(v_scale_ptr + slots * H_KV + kv_head, mask=valid, other=0.0)
        k = k.to(tl.float32) * k_scale[:, None]
        v = v.to(tl.float32) * v_scale[:, None]
    return k.to(OUT_DTYPE), v.to(OUT_DTYPE)


@triton.jit
def softmax_step(acc, m_i, l_i, q, k, v, visible, scale, softcap,
                 PRECISION: tl.constexpr, ACC: tl.constexpr, SOFTCAP: tl.constexpr):
    """One online-softmax update of (acc, m_i, l_i) with keys k / values v [N, D]; with
    SOFTCAP the scaled scores s become softcap * tanh(s / softcap) first (Gemma 2).
    m_i starts at a finite -1e30, so a row whose keys are all masked stays NaN-free."""
    if ACC == tl.float64:  # not every Triton release compiles an fp64 tl.dot: multiply-add
        s = tl.sum(q[:, None, :] * k[None, :, :], 2) * scale
    else:
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(ACC) * scale
    if SOFTCAP:
        # tanh from exp (libdevice's tanh does not run under the CPU interpreter), on |s|
        # so exp never overflows: tanh|x| = (1 - e) / (1 + e) with e = exp(-2|x|)
        e = tl.exp(-2.0 * tl.abs(s) / softcap)
        t = (1.0 - e) / (1.0 + e)
        s = tl.where(s < 0.0, -t, t) * softcap
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if ACC == tl.float64:
        pv = tl.sum(p[:, :, None] * v[None, :, :], 1)
    else:
        pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(ACC)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i

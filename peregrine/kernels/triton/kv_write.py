"""The KV-cache write kernel (vLLM's reshape_and_cache): each new token's K/V rows go to
their paged slot; int8/fp8 caches get them quantized per token and kv head.

A program copies a block of (token, kv head) rows. A negative slot means "no slot" (the
padded rows of a CUDA-graph batch) and is skipped."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from peregrine.attention_backend import LayerCache
from peregrine.kernels.triton.paged import quant_mode


@triton.jit
def round_half_even(x):
    """torch.round: nearest integer, ties to even (float in, float out)."""
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def round_to_e4m3(x):
    """float32 x (|x| <= 448) rounded to the nearest float8 e4m3fn value, ties to even, as
    float32. Rounding here makes the final cast exact, so it does not matter how a backend
    (GPU or interpreter) rounds its own fp32 -> fp8 conversion."""
    bits = x.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1  # e4m3 keeps 3 of float32's 23 mantissa bits
    normal = ((bits + 0x7FFFF + lsb) & -0x100000).to(tl.float32, bitcast=True)
    subnormal = round_half_even(x * 512.0) * (1.0 / 512.0)  # e4m3 subnormals: k * 2^-9
    return tl.where(tl.abs(x) < 0.015625, subnormal, normal)


@triton.jit
def _store_rows(src_ptr, dst_ptr, scale_ptr, mask, row_mask, QUANT: tl.constexpr):
    """Copy [rows, D] values to the cache; quantized: one absmax scale per row."""
    x = tl.load(src_ptr, mask=mask, other=0.0)
    if QUANT == 0:
        tl.store(dst_ptr, x.to(dst_ptr.dtype.element_ty), mask=mask)
    else:
        x = x.to(tl.float32)
        amax = tl.max(tl.abs(x), 1)
        if QUANT == 1:
            scale = amax / 127.0  # int8 max
        else:
            scale = amax / 448.0  # float8 e4m3fn max
        y = x / tl.where(scale > 0.0, scale, 1.0)[:, None]
        if QUANT == 1:
            y = tl.minimum(tl.maximum(round_half_even(y), -127.0), 127.0)
        else:
            y = round_to_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0))
        tl.store(dst_ptr, y.to(dst_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr, scale, mask=row_mask)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                     slot_ptr, num_rows, stride_kt, stride_kh, stride_vt, stride_vh,
                     H: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr, QUANT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # row = token * H + kv head
    offs_d = tl.arange(0, BLOCK_D)
    tok = (rows // H).to(tl.int64)
    head = rows % H
    slot = tl.load(slot_ptr + tok, mask=rows < num_rows, other=-1).to(tl.int64)
    row_mask = slot >= 0
    mask = row_mask[:, None] & (offs_d[None, :] < D)
    dst = (slot * (H * D) + head * D)[:, None] + offs_d[None, :]
    _store_rows(k_ptr + (tok * stride_kt + head * stride_kh)[:, None] + offs_d[None, :],
                k_cache_ptr + dst, k_scale_ptr + slot * H + head, mask, row_mask, QUANT)
    _store_rows(v_ptr + (tok * stride_vt + head * stride_vh)[:, None] + offs_d[None, :],
                v_cache_ptr + dst, v_scale_ptr + slot * H + head, mask, row_mask, QUANT)


def write_kv(cache: LayerCache, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store k/v [T, Hkv, D] at flat slots `slot_mapping` [T] (slot = block * size + offset;
    negative: skipped), quantizing when the cache is int8 (absmax/127) or fp8 (absmax/448)."""
    t, h, d = k.shape
    if t == 0:
        return
    assert cache.k.is_contiguous() and cache.v.is_contiguous(), "KV cache must be contiguous"
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "k/v need a contiguous last dim"
    quant = quant_mode(cache.k.dtype)
    k_scale = cache.k_scale if quant else cache.k  # unused pointer when not quantized
    v_scale = cache.v_scale if quant else cache.v
    block_d = triton.next_power_of_2(d)
    block_r = max(1, 4096 // block_d)  # ~4K values per program
    _write_kv_kernel[(triton.cdiv(t * h, block_r),)](
        k, v, cache.k, cache.v, k_scale, v_scale, slot_mapping, t * h,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        H=h, D=d, BLOCK_R=block_r, BLOCK_D=block_d, QUANT=quant, num_warps=4)


def kernels_interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 was set
    when they were first imported)."""
    return isinstance(_write_kv_kernel, InterpretedFunction) and isinstance(tl.zeros,
                                                                           InterpretedFunction)

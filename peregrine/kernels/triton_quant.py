"""Triton dequant-GEMM for the quantized linears on GPU: y = x W^T with W dequantized tile
by tile in registers (int8, int4, nf4; same tensors as the CPU kernels, see
peregrine/layers/quant_formats.py). Tested on CPU with TRITON_INTERPRET=1."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_FORMATS = {"int8": 0, "int6": 0, "int4": 1, "nf4": 2}  # int6: one byte per weight too


@triton.jit
def _dequant_matmul(x_ptr, q_ptr, s_ptr, o_ptr, lut_ptr, y_ptr, M, N, K, S, G,
                    FORMAT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, BYTE_OFFSET: tl.constexpr = False):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :],
                    mask=(rm[:, None] < M) & kmask[None, :], other=0.0).to(tl.float32)
        wmask = kmask[:, None] & (rn[None, :] < N)
        sidx = rn[None, :] * S + (rk // G)[:, None]  # [BLOCK_K, BLOCK_N]
        scale = tl.load(s_ptr + sidx, mask=wmask, other=0.0).to(tl.float32)
        if FORMAT == 0:
            q = tl.load(q_ptr + rn[None, :] * K + rk[:, None], mask=wmask, other=0)
            w = q.to(tl.float32) * scale
            if BYTE_OFFSET:  # GGUF K-quant minimums (int6, or int8 fused with them)
                w += tl.load(o_ptr + sidx, mask=wmask, other=0.0).to(tl.float32)
        else:
            # GGUF nibble order: in each run of 32, byte i holds weight i (low), i + 16 (high)
            byte_idx = (rk // 32) * 16 + rk % 16
            b = tl.load(q_ptr + rn[None, :] * (K // 2) + byte_idx[:, None], mask=wmask, other=0)
            b = b.to(tl.int32)
            nib = tl.where(((rk % 32) >= 16)[:, None], b >> 4, b & 15)
            if FORMAT == 1:
                off = tl.load(o_ptr + sidx, mask=wmask, other=0.0).to(tl.float32)
                w = nib.to(tl.float32) * scale + off
            else:
                w = tl.load(lut_ptr + nib) * scale
        acc += tl.dot(x, w, input_precision="ieee")
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc,
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def quant_matmul(x: torch.Tensor, layer: torch.nn.Module, block_m: int = 16,
                 block_n: int = 64, block_k: int = 32) -> torch.Tensor:
    """x [M, K] @ W^T of an Int8Linear / Int6Linear / Int4Linear / NF4Linear (bias not
    added)."""
    fmt = _FORMATS.get(layer.method)
    if fmt is None:
        raise ValueError(f"no Triton kernel for {layer.method!r} weights")
    layer = layer.plain()  # GGUF K-quants' int8 sub-block scales multiplied out
    x = x.contiguous()
    m, k = x.shape
    n = layer.out_features
    g = layer.group_size or k  # one group per row: every column maps to scale column 0
    s = layer.scale.shape[1]
    y = torch.empty((m, n), dtype=torch.float32, device=x.device)
    byte_offset = fmt == 0 and getattr(layer, "offset", None) is not None
    offset = layer.offset if fmt == 1 or byte_offset else layer.scale
    lut = layer.levels if fmt == 2 else layer.scale
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _dequant_matmul[grid](x, layer.qweight, layer.scale, offset, lut, y, m, n, k, s, g,
                          FORMAT=fmt, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                          BYTE_OFFSET=byte_offset)
    return y.to(x.dtype)

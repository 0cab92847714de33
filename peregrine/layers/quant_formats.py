"""Weight formats: round-to-nearest quantization, 4-bit packing and reference dequantization.

Every format stores an [N, K] weight (N outputs, K inputs) so that the CPU kernels and the
Triton kernels read the same tensors:

    int8  q int8 [N, K],       scale f32 [N, S] (offset f32)      w = scale * q (+ offset)
    int4  q uint8 [N, K/2],    scale, offset f16 or f32 [N, S]    w = scale * q + offset, q in 0..15
    int6  q uint8 [N, K],      scale, offset f32 [N, S]           w = scale * q + offset, q in 0..63
    int5  q uint8 [N, 5K/8],   scale, offset f16 or f32 [N, S]    w = scale * q + offset, q in 0..31
          (a row's low nibbles packed as int4's, then its fifth bits: bit j of the row's
          bit string is weight j's, 4 bytes per 32 weights; GGUF Q5_x's own layout)
    nf4   q uint8 [N, K/2],    scale f16 [N, S]                   w = scale * NF4[q]
    fp8   q float8_e4m3fn [N, K], scale f32 [N]                   w = scale * q

K is a multiple of 32. A group of G weights along K shares a scale; G is 32 times a power
of two and need not divide K (the last group of a row is then shorter; SmolLM2's K = 576 is
4.5 groups of 128), or 16 (GGUF K-quants' Q2_K, Q3_K, Q6_K): S = ceil(K / G). One scale
per row (per-channel int8) is S = 1. float32 scales and int6 and offsets on int8 come from
GGUF K-quants (models/gguf_native.py), whose scales are products not exact in float16. Asymmetric int4 (min/max) and GGUF Q4_1 fit `scale * q + offset`
directly; symmetric int4 and GGUF Q4_0 are offset = -8 * scale. 4-bit values are packed in
GGUF's order: in each run of 32 weights, byte i holds weight i (low nibble) and i + 16 (high)."""

from __future__ import annotations

import torch

# The 16 levels of NF4 (normal-float 4-bit, QLoRA): quantiles of N(0, 1) scaled to [-1, 1].
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def check_shape(w: torch.Tensor, group_size: int | None) -> None:
    """Raise ValueError unless `w` is [N, K] with K a multiple of 32 and `group_size` is
    None (one group per row) or 32 times a power of two."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    if w.shape[1] % 32:
        raise ValueError(f"in_features ({w.shape[1]}) must be a multiple of 32 to quantize")
    g = group_size
    if g is not None and (g < 32 or g % 32 or (g // 32) & (g // 32 - 1)):
        raise ValueError(f"group_size must be 32 times a power of two, got {g}")


def num_groups(k: int, group_size: int | None) -> int:
    return 1 if group_size is None else -(-k // group_size)


def infer_group_size(k: int, num_scales: int) -> int | None:
    """The group size that gives `num_scales` groups per row of K weights (None: one)."""
    if num_scales == 1:
        return None
    if num_scales * 16 == k:
        return 16
    g = 32
    while -(-k // g) > num_scales:
        g *= 2
    if -(-k // g) != num_scales:
        raise ValueError(f"{num_scales} scales per row fit no group size for K = {k}")
    return g


def group_view(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """w [N, K] as float32 [N, S, G]; a short last group is padded with its own last value
    (which leaves its min, max and absmax unchanged)."""
    n, k = w.shape
    g = k if group_size is None else group_size
    s = num_groups(k, group_size)
    w = w.float()
    if s * g != k:
        w = torch.cat([w, w[:, -1:].expand(n, s * g - k)], dim=1)
    return w.reshape(n, s, g)


def expand_groups(groups: torch.Tensor, k: int, group_size: int | None) -> torch.Tensor:
    """Per-group values [N, S] -> per-weight float32 [N, K]."""
    if group_size is None:
        return groups.float().expand(-1, k) if groups.shape[1] == 1 else groups.float()
    idx = torch.arange(k, device=groups.device) // group_size
    return groups.float()[:, idx]


# --- 4-bit packing -----------------------------------------------------------------------------

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [N, K] -> packed bytes [N, K/2] (GGUF nibble order)."""
    n, k = q.shape
    blocks = q.to(torch.uint8).reshape(n, k // 32, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Packed bytes [N, K/2] -> uint8 values 0..15 [N, K]."""
    n, half = packed.shape
    blocks = packed.reshape(n, half // 16, 1, 16)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=2).reshape(n, half * 2)


def pack_int5(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..31 [N, K] -> [N, K/2 + K/8]: int4-packed low nibbles, then the fifth
    bits, 8 bytes per pair of 32-blocks (A, B) in the order the kernel takes them: the 64
    bits of a pair go to the kernel's two 32-lane halves lo = [A 0..15 | B 0..15] and hi =
    [A 16..31 | B 16..31], and byte j holds lanes j, j+8, j+16, j+24 of lo (bits 0-3) and of
    hi (bits 4-7), so one broadcast of the 8 bytes and a per-lane bit mask place every bit.
    A last lone block A keeps 4 bytes, bit j = weight j."""
    import numpy as np
    q = q.to(torch.uint8)
    n, k = q.shape
    bits = ((q >> 4) & 1).numpy()
    pairs = k // 64
    lanes = bits[:, :pairs * 64].reshape(n, pairs, 2, 2, 16)  # [row, pair, block, half, 16]
    lo = lanes[:, :, :, 0].reshape(n, pairs, 4, 8)  # lane 8 * s + j, s = the lane's bit
    hi = lanes[:, :, :, 1].reshape(n, pairs, 4, 8)
    shifts = np.arange(4, dtype=np.uint8).reshape(1, 1, 4, 1)
    packed = ((lo << shifts).sum(axis=2) | (hi << (shifts + 4)).sum(axis=2)).astype(np.uint8)
    parts = [pack_int4(q & 0x0F), torch.from_numpy(packed.reshape(n, pairs * 8))]
    if k % 64:
        parts.append(torch.from_numpy(np.packbits(bits[:, pairs * 64:], axis=1,
                                                  bitorder="little")))
    return torch.cat(parts, dim=1).contiguous()


def unpack_int5(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2 + K/8] (see pack_int5) -> uint8 values 0..31 [N, K]."""
    import numpy as np
    n, width = packed.shape
    k = width // 5 * 8
    pairs = k // 64
    fifth = packed[:, k // 2:].contiguous().numpy()
    by_pair = fifth[:, :pairs * 8].reshape(n, pairs, 1, 8)
    shifts = np.arange(4, dtype=np.uint8).reshape(1, 1, 4, 1)
    lo = ((by_pair >> shifts) & 1).reshape(n, pairs, 1, 2, 16)  # [row, pair, -, block, 16]
    hi = ((by_pair >> (shifts + 4)) & 1).reshape(n, pairs, 1, 2, 16)
    high = np.concatenate([lo, hi], axis=2).transpose(0, 1, 3, 2, 4).reshape(n, pairs * 64)
    if k % 64:
        tail = np.unpackbits(fifth[:, pairs * 8:], axis=1, bitorder="little")
        high = np.concatenate([high, tail], axis=1)
    return unpack_int4(packed[:, :k // 2].contiguous()) | (torch.from_numpy(high) << 4)


# --- round-to-nearest quantizers -------------------------------------------------------------

def quantize_int8(w: torch.Tensor, group_size: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 (levels -127..127): (q [N, K], scale f32 [N, S])."""
    check_shape(w, group_size)
    n, k = w.shape
    scale = group_view(w, group_size).abs().amax(-1) / 127.0
    q = torch.round(w.float() / expand_groups(torch.where(scale == 0, 1.0, scale), k,
                                              group_size)).clamp_(-127, 127)
    return q.to(torch.int8), scale


def int4_params(w: torch.Tensor, group_size: int | None, symmetric: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, offset) [N, S], float16-exact, for `w` [N, K]."""
    wg = group_view(w, group_size)
    if symmetric:
        scale = (wg.abs().amax(-1) / 7.5).half()  # levels -8..7 times scale, centred
        return scale, (-8.0 * scale.float()).half()
    lo, hi = wg.amin(-1), wg.amax(-1)  # min/max like GGUF Q4_1: a group-wise affine grid
    scale = ((hi - lo) / 15.0).half()
    return scale, lo.half()


def quantize_int4_with(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                       group_size: int | None) -> torch.Tensor:
    """Nearest 4-bit values 0..15 [N, K] of `w` under given group scale/offset [N, S]."""
    k = w.shape[1]
    s = expand_groups(scale, k, group_size)
    o = expand_groups(offset, k, group_size)
    q = torch.round((w.float() - o) / torch.where(s == 0, 1.0, s))
    return q.clamp_(0, 15).to(torch.uint8)


def quantize_int4(w: torch.Tensor, group_size: int | None = 128, symmetric: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise int4: (packed [N, K/2], scale f16 [N, S], offset f16 [N, S])."""
    check_shape(w, group_size)
    scale, offset = int4_params(w, group_size, symmetric)
    return pack_int4(quantize_int4_with(w, scale, offset, group_size)), scale, offset


def nf4_codes(normed: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 level of values in [-1, 1]."""
    mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
    return torch.bucketize(normed.contiguous(), mids.to(normed.device)).to(torch.uint8)


def quantize_nf4(w: torch.Tensor, group_size: int | None = 64
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 with group-wise absmax: (packed [N, K/2], scale f16 [N, S])."""
    check_shape(w, group_size)
    k = w.shape[1]
    scale = group_view(w, group_size).abs().amax(-1).half()
    s = expand_groups(scale, k, group_size)
    return pack_int4(nf4_codes(w.float() / torch.where(s == 0, 1.0, s))), scale


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 e4m3 with per-output-channel scales: (q [N, K], scale f32 [N])."""
    if not hasattr(torch, "float8_e4m3fn"):
        raise ValueError("this torch build has no float8_e4m3fn dtype; fp8 is unavailable")
    scale = w.float().abs().amax(-1) / FP8_MAX
    q = (w.float() / torch.where(scale == 0, 1.0, scale)[:, None]).clamp(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn), scale


# --- reference dequantization ----------------------------------------------------------------

def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, group_size: int | None,
                    offset: torch.Tensor | None = None) -> torch.Tensor:
    w = q.float() * expand_groups(scale, q.shape[1], group_size)
    return w if offset is None else w + expand_groups(offset, q.shape[1], group_size)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                    group_size: int | None) -> torch.Tensor:
    q = unpack_int4(packed).float()
    k = q.shape[1]
    return q * expand_groups(scale, k, group_size) + expand_groups(offset, k, group_size)


def dequantize_nf4(packed: torch.Tensor, scale: torch.Tensor, group_size: int | None
                   ) -> torch.Tensor:
    q = unpack_int4(packed)
    return (NF4_LEVELS.to(scale.device)[q.long()]
            * expand_groups(scale, q.shape[1], group_size))


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def quantize_activations(x: torch.Tensor, top: float = 32767.0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """What the CPU kernels do to x [M, K]: integers with a scale d = absmax / top per
    group, xq = round(x / d) (as x * (1 / d), ties to even). top 32767 (int16) is
    quant_linear.cpp's, one group per run of 32 values; top 127 (int8) is q8_decode.cpp's,
    four groups of 8 per run of 32 (group g = values 4g..4g+3 and 16+4g..16+4g+3, the values
    one int32 lane of its dot product sums). Returns the dequantized x (float32) and each
    value's step d [M, K] -- the reference for the kernels."""
    m, k = x.shape
    if top == 127.0:  # [rows, blocks, half, group, 4]: value 16 * half + 4 * group + j
        xb = x.float().reshape(m, k // 32, 2, 4, 4)
        d = xb.abs().amax(dim=(2, 4), keepdim=True) / top
    else:
        xb = x.float().reshape(m, k // 32, 32)
        d = xb.abs().amax(-1, keepdim=True) / top
    inv = torch.where(d == 0, 0.0, 1.0 / torch.where(d == 0, 1.0, d))
    xq = torch.round(xb * inv)
    return (xq * d).reshape(m, k), d.expand_as(xb).reshape(m, k)

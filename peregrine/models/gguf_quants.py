"""GGUF block types unpacked into integers, scales and offsets.

Every supported type decodes, one group of G weights at a time, as

    w = scale * q            (symmetric types: q signed)
    w = scale * q + offset   (types with a minimum: q unsigned)

with `scale` and `offset` float32 per group (G = 16 or 32): K-quants' super-block scales
are folded in (d * sc, dmin * m) exactly as llama.cpp's reference computes them, so
`dequantize` is bit-exact against the gguf package. The kernels take the same
(q, scale, offset) and never see the packed bits (peregrine/models/gguf_native.py); for the
K-quants they may take the scales as stored instead (`SubScales`: the sub-block integers and
a float32 factor per super-block), which is 4.75 bits a weight for Q4_K instead of 6."""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

QT = gguf.GGMLQuantizationType

QK_K = 256  # weights per K-quant super-block
# IQ4_NL / IQ4_XS: the 16 non-linear levels their 4-bit indices select
IQ4_LEVELS = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69,
                           89, 113], dtype=torch.int8)


@dataclass(frozen=True)
class BlockForm:
    """How one GGUF type unpacks: q's range, the group size, and whether it has offsets."""

    qmin: int
    qmax: int
    group: int
    offset: bool
    f16_exact: bool  # scale (and offset) are float16 fields as stored: no rounding in f16


BLOCK_FORMS: dict[QT, BlockForm] = {
    QT.Q8_0: BlockForm(-128, 127, 32, False, True),
    QT.Q4_0: BlockForm(-8, 7, 32, False, True),
    QT.Q4_1: BlockForm(0, 15, 32, True, True),
    QT.Q5_0: BlockForm(-16, 15, 32, False, True),
    QT.Q5_1: BlockForm(0, 31, 32, True, True),
    QT.Q2_K: BlockForm(0, 3, 16, True, False),
    QT.Q3_K: BlockForm(-4, 3, 16, False, False),
    QT.Q4_K: BlockForm(0, 15, 32, True, False),
    QT.Q5_K: BlockForm(0, 31, 32, True, False),
    QT.Q6_K: BlockForm(-32, 31, 16, False, False),
    QT.IQ4_NL: BlockForm(-127, 113, 32, False, True),
    QT.IQ4_XS: BlockForm(-127, 113, 32, False, False),
}


# K-quants: 256-weight super-blocks whose groups' scales are a small integer times one factor
SUPER_BLOCK_TYPES = frozenset({QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K})


@dataclass
class SubScales:
    """A K-quant's scales as stored: scale = scale_sub * scale_super per group, the super
    factor shared by the groups of 256 weights (likewise the offset); exact in float32."""

    scale_sub: torch.Tensor  # int8 [N, K / group]
    scale_super: torch.Tensor  # float32 [N, K / 256]
    offset_sub: torch.Tensor | None  # int8 [N, K / group]
    offset_super: torch.Tensor | None  # float32 [N, K / 256]

    def map_rows(self, f) -> "SubScales":
        """The same with `f` applied to every tensor's rows (a permutation or a slice)."""
        off = self.offset_sub is not None
        return SubScales(f(self.scale_sub), f(self.scale_super),
                         f(self.offset_sub) if off else None, f(self.offset_super) if off else None)


@dataclass
class Unpacked:
    """A tensor's weights as w = scale * q (+ offset), groups of `group` along each row."""

    q: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32 [N, K / group]
    offset: torch.Tensor | None  # float32 [N, K / group]
    group: int
    sub: SubScales | None = None  # K-quants: the same scales and offsets as stored

    def map_rows(self, f) -> "Unpacked":
        """The same with `f` applied to the rows of every tensor (a permutation or a slice)."""
        return Unpacked(f(self.q), f(self.scale), None if self.offset is None else f(self.offset),
                        self.group, None if self.sub is None else self.sub.map_rows(f))

    def dequantize(self) -> torch.Tensor:
        """Float32 [N, K], computed as the reference does (scale * q, then + offset)."""
        n, k = self.q.shape
        w = self.q.float().reshape(n, k // self.group, self.group) * self.scale.unsqueeze(-1)
        if self.offset is not None:
            w += self.offset.unsqueeze(-1)
        return w.reshape(n, k)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Float16 fields (2 bytes at the end of dim -1) as float32 [nb, 1]."""
    return b.contiguous().view(torch.float16).float()


def _bits(b: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """b [..., n] shifted by each of `shifts` into a new dim before the last, masked."""
    sh = torch.tensor(shifts, dtype=torch.uint8).reshape(len(shifts), 1)
    return (b.unsqueeze(-2) >> sh) & mask


def _signed(u: torch.Tensor, bias: int) -> torch.Tensor:
    """uint8 values below 2 * bias as int8 u - bias."""
    return u.view(torch.int8) - bias


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: the 8 six-bit scales and mins packed in 12 bytes, as uint8 [nb, 8]."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _qh32(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1: bit j of the 4 high-bit bytes is weight j's fifth bit, as uint8 [nb, 32]."""
    return torch.from_numpy(np.unpackbits(qh.contiguous().numpy(), axis=-1, bitorder="little"))


def _low_high(qs: torch.Tensor) -> torch.Tensor:
    """Legacy 32-blocks: byte i holds weight i (low nibble) and i + 16 (high), as [nb, 32]."""
    return _bits(qs, [0, 4], 0x0F).reshape(qs.shape[0], 32)


def unpack_blocks(raw: torch.Tensor, qtype: QT) -> tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor | None]:
    """Raw bytes of a run of blocks -> (q int8 [nb, B], scale [nb, B/G], offset or None).
    The bit twiddling stays in uint8 (every type's integers fit a byte) for speed."""
    if qtype in SUPER_BLOCK_TYPES:
        q, sc, d, mn, dmin = _unpack_super_blocks(raw, qtype)
        return q, d * sc.float(), None if mn is None else -(dmin * mn.float())
    return _unpack_plain_blocks(raw, qtype)


def _unpack_super_blocks(raw: torch.Tensor, qtype: QT) -> tuple[torch.Tensor, ...]:
    """K-quant blocks -> (q int8 [nb, 256], sc int8 [nb, 256/G], d float32 [nb, 1], m int8
    [nb, 256/G] or None, dmin [nb, 1] or None): scale = d * sc, offset = -dmin * m."""
    size = {QT.Q2_K: 84, QT.Q3_K: 110, QT.Q4_K: 144, QT.Q5_K: 176, QT.Q6_K: 210}[qtype]
    b = raw.reshape(-1, size)
    nb = b.shape[0]
    if qtype == QT.Q2_K:
        scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
        q = _bits(qs.reshape(nb, 2, 32), [0, 2, 4, 6], 3).reshape(nb, QK_K)
        return (q.view(torch.int8), (scales & 0xF).view(torch.int8), d,
                (scales >> 4).view(torch.int8), dmin)
    if qtype == QT.Q3_K:
        hmask, qs, sc, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
        low = _bits(sc[:, :8], [0, 4], 0x0F).reshape(nb, 16)
        high = _bits(sc[:, 8:], [0, 2, 4, 6], 0x03).reshape(nb, 16)
        ql = _bits(qs.reshape(nb, 2, 32), [0, 2, 4, 6], 3).reshape(nb, QK_K)
        qh = _bits(hmask.reshape(nb, 1, 32), list(range(8)), 1).reshape(nb, QK_K) ^ 1
        return (ql.view(torch.int8) - (qh << 2).view(torch.int8), _signed(low | (high << 4), 32),
                d, None, None)
    if qtype in (QT.Q4_K, QT.Q5_K):
        d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
        sc, mn = _k_scale_min(b[:, 4:16])
        if qtype == QT.Q4_K:
            q = _bits(b[:, 16:].reshape(nb, 4, 32), [0, 4], 0x0F).reshape(nb, QK_K)
        else:
            ql = _bits(b[:, 48:].reshape(nb, 4, 32), [0, 4], 0x0F).reshape(nb, QK_K)
            qh = _bits(b[:, 16:48].reshape(nb, 1, 32), list(range(8)), 1).reshape(nb, QK_K)
            q = ql | (qh << 4)
        return q.view(torch.int8), sc.view(torch.int8), d, mn.view(torch.int8), dmin
    ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])  # Q6_K
    low = _bits(ql.reshape(nb, 2, 64), [0, 4], 0x0F).reshape(nb, QK_K)
    high = _bits(qh.reshape(nb, 2, 32), [0, 2, 4, 6], 3).reshape(nb, QK_K)
    return _signed(low | (high << 4), 32), sc.contiguous().view(torch.int8), d, None, None


def _unpack_plain_blocks(raw: torch.Tensor, qtype: QT) -> tuple[torch.Tensor, torch.Tensor,
                                                                 torch.Tensor | None]:
    """unpack_blocks for the types without super-blocks."""
    size = {QT.Q8_0: 34, QT.Q4_0: 18, QT.Q4_1: 20, QT.Q5_0: 22, QT.Q5_1: 24, QT.Q2_K: 84,
            QT.Q3_K: 110, QT.Q4_K: 144, QT.Q5_K: 176, QT.Q6_K: 210, QT.IQ4_NL: 18,
            QT.IQ4_XS: 136}[qtype]
    b = raw.reshape(-1, size)
    nb = b.shape[0]
    if qtype == QT.Q8_0:
        return b[:, 2:].contiguous().view(torch.int8), _f16(b[:, :2]), None
    if qtype == QT.Q4_0:
        return _signed(_low_high(b[:, 2:]), 8), _f16(b[:, :2]), None
    if qtype == QT.Q4_1:
        return _low_high(b[:, 4:]).view(torch.int8), _f16(b[:, :2]), _f16(b[:, 2:4])
    if qtype == QT.Q5_0:
        q = _low_high(b[:, 6:]) | (_qh32(b[:, 2:6]) << 4)
        return _signed(q, 16), _f16(b[:, :2]), None
    if qtype == QT.Q5_1:
        q = _low_high(b[:, 8:]) | (_qh32(b[:, 4:8]) << 4)
        return q.view(torch.int8), _f16(b[:, :2]), _f16(b[:, 2:4])
    if qtype == QT.IQ4_NL:
        return IQ4_LEVELS[_low_high(b[:, 2:]).long()], _f16(b[:, :2]), None
    if qtype == QT.IQ4_XS:
        d = _f16(b[:, :2])
        sh = b[:, 2:4].contiguous().view(torch.int16).to(torch.int32)  # [nb, 1]
        low = _bits(b[:, 4:8], [0, 4], 0x0F).transpose(1, 2).reshape(nb, 8)
        high = (sh >> torch.arange(0, 16, 2, dtype=torch.int32)) & 3
        ls = (low.to(torch.int32) | (high << 4)) - 32
        idx = _bits(b[:, 8:].reshape(nb, 8, 16), [0, 4], 0x0F).reshape(nb, QK_K)
        return IQ4_LEVELS[idx.long()], d * ls.float(), None
    raise ValueError(f"no unpacking for GGUF type {qtype.name}")


def unpack(raw: torch.Tensor, qtype: QT, shape: tuple[int, int]) -> Unpacked:
    """One [N, K] tensor's raw bytes as integers, scales and offsets (`BLOCK_FORMS`)."""
    n, k = shape
    form = BLOCK_FORMS[qtype]
    if qtype not in SUPER_BLOCK_TYPES:
        q, scale, offset = unpack_blocks(raw.reshape(-1), qtype)
        return Unpacked(q.reshape(n, k), scale.reshape(n, k // form.group),
                        None if offset is None else offset.reshape(n, k // form.group), form.group)
    q, sc, d, mn, dmin = _unpack_super_blocks(raw.reshape(-1), qtype)
    groups, supers = k // form.group, k // QK_K
    sub = SubScales(sc.reshape(n, groups), d.reshape(n, supers),
                    None if mn is None else mn.reshape(n, groups),
                    None if dmin is None else -dmin.reshape(n, supers))
    scale = (sub.scale_sub.float().reshape(n, supers, -1)
             * sub.scale_super.unsqueeze(-1)).reshape(n, groups)
    offset = None if mn is None else (sub.offset_sub.float().reshape(n, supers, -1)
                                      * sub.offset_super.unsqueeze(-1)).reshape(n, groups)
    return Unpacked(q.reshape(n, k), scale, offset, form.group, sub)

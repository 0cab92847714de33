"""Tensor-parallel layers (Megatron-LM), made from a loaded model's own modules by slicing
their weights, float or quantized.

A column-parallel linear is a plain (smaller) linear holding some output rows: its rank
computes a slice of the outputs and needs no communication. A row-parallel linear holds
some input columns: each rank computes a partial sum over its columns and one all-reduce
adds them up (the bias is added once, after it). The vocabulary-parallel embedding holds
some rows of the table (a token outside them looks up zeros, and the all-reduce brings in
the owner's row, exactly); the vocabulary-parallel LM head computes some logits and
gathers them on the group's first rank, the one that samples.

Quantized weights are sliced in their packed form. Output rows are always free to split;
input columns only on the format's grid: multiples of 32 weights, and whole groups of
scales (a split that cuts a group raises ValueError naming the group sizes that fit)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peregrine.layers.comm import ParallelGroup
from peregrine.layers.linear import (FP8Linear, Int4Linear, Int5Linear, Int6Linear,
                                     Int8Linear, Linear, NF4Linear, QuantLinear)

AnyLinear = Linear | QuantLinear


class ParallelModule(nn.Module):
    """A module that talks to other ranks in its forward: a model holding one cannot run
    in one process alone (the fused CPU step, CUDA graphs)."""


def is_parallel(model: nn.Module) -> bool:
    """Whether `model` was split across ranks (holds a ParallelModule)."""
    return any(isinstance(m, ParallelModule) for m in model.modules())


def linear_from(weight: torch.Tensor | nn.Parameter, bias: torch.Tensor | None) -> Linear:
    """A Linear around existing tensors (a Parameter is shared, not copied)."""
    out_features, in_features = weight.shape
    with torch.device("meta"):  # no throw-away allocation of the full weight
        lin = Linear(in_features, out_features, bias=bias is not None)
    lin.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(
        weight.contiguous(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return lin


def slice_rows(lin: AnyLinear, rows: torch.Tensor) -> AnyLinear:
    """The linear computing only output rows `rows` (an index tensor) of `lin`, bias too."""
    bias = None if lin.bias is None else lin.bias.data[rows]
    if isinstance(lin, Linear):
        return linear_from(lin.weight.data[rows], bias)
    if isinstance(lin, QuantLinear):  # K-quants' sub-block scales: slice float32 ones
        lin = lin.plain()
    if isinstance(lin, Int8Linear):
        return Int8Linear(lin.qweight[rows], lin.scale[rows], bias,
                          offset=None if lin.offset is None else lin.offset[rows])
    if isinstance(lin, Int6Linear):
        return Int6Linear(lin.qweight[rows], lin.scale[rows], lin.offset[rows], bias)
    if isinstance(lin, Int5Linear):
        return Int5Linear(lin.qweight[rows], lin.scale[rows], lin.offset[rows], bias,
                          scale_dtype=lin.scale.dtype)
    if isinstance(lin, Int4Linear):
        return Int4Linear(lin.qweight[rows], lin.scale[rows], lin.offset[rows], bias,
                          scale_dtype=lin.scale.dtype)
    if isinstance(lin, NF4Linear):
        return NF4Linear(lin.qweight[rows], lin.scale[rows], bias)
    if isinstance(lin, FP8Linear):
        return FP8Linear(lin.qweight[rows], lin.scale[rows], bias)
    raise ValueError(f"cannot split a {type(lin).__name__} across ranks")


def fitting_group_sizes(k: int) -> list[int]:
    """Group sizes (32 times a power of two) whose groups tile `k` input columns."""
    return [g for g in (32 << i for i in range(12)) if g <= k and k % g == 0]


def slice_columns(lin: AnyLinear, start: int, end: int) -> AnyLinear:
    """The linear computing the partial sums of `lin` over input columns [start, end),
    without bias (a row-parallel layer adds it once, after the all-reduce)."""
    if isinstance(lin, Linear):
        return linear_from(lin.weight.data[:, start:end], None)
    if not isinstance(lin, (Int8Linear, Int6Linear, Int5Linear, Int4Linear, NF4Linear,
                            FP8Linear)):
        raise ValueError(f"cannot split a {type(lin).__name__} across ranks")
    lin = lin.plain()
    if start % 32 or (end % 32 and end != lin.in_features):
        raise ValueError(f"columns [{start}, {end}) of a quantized weight do not fall on its "
                         "32-weight grid")
    g = getattr(lin, "group_size", None)
    scale = lin.scale
    per_row = scale.dim() == 1 or scale.shape[1] == 1  # one scale for the whole row
    if not per_row:
        if start % g or (end % g and end != lin.in_features):
            fits = fitting_group_sizes(end - start)
            raise ValueError(
                f"{end - start} input columns per rank cut its quantization groups of {g} "
                f"weights; quantize with quantization_group_size in {fits} or choose another "
                "tensor_parallel_size")
        scale = scale[:, start // g:-(-end // g)]
    offset = getattr(lin, "offset", None)
    if offset is not None and not per_row:
        offset = offset[:, start // g:-(-end // g)]
    if isinstance(lin, Int8Linear):
        return Int8Linear(lin.qweight[:, start:end], scale, offset=offset)
    if isinstance(lin, Int6Linear):
        return Int6Linear(lin.qweight[:, start:end], scale, offset)
    if isinstance(lin, Int5Linear):  # nibbles, then the fifth-bit plane (8 weights a byte)
        k = lin.in_features
        nib, bits = lin.qweight[:, :k // 2], lin.qweight[:, k // 2:]
        packed = torch.cat([nib[:, start // 2:end // 2], bits[:, start // 8:end // 8]], dim=1)
        return Int5Linear(packed, scale, offset, scale_dtype=lin.scale.dtype)
    if isinstance(lin, FP8Linear):
        return FP8Linear(lin.qweight[:, start:end], scale)
    packed = lin.qweight[:, start // 2:end // 2]  # two 4-bit weights per byte, runs of 32
    if isinstance(lin, Int4Linear):
        return Int4Linear(packed, scale, offset, scale_dtype=lin.scale.dtype)
    return NF4Linear(packed, scale)


class RowParallelLinear(ParallelModule):
    """y = all_reduce(x_local W_local^T) + b: this rank's input columns of a linear."""

    def __init__(self, inner: AnyLinear, bias: torch.Tensor | None, group: ParallelGroup,
                 in_features: int) -> None:
        super().__init__()
        self.inner = inner
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        self.group = group
        self.in_features = in_features  # of the whole layer
        self.out_features = inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.all_reduce(self.inner(x))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(ParallelModule):
    """The rows [start, end) of an embedding table; lookups are summed over the group."""

    def __init__(self, weight: torch.Tensor, start: int, group: ParallelGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.start, self.end = start, start + weight.shape[0]
        self.group = group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mine = (input_ids >= self.start) & (input_ids < self.end)
        local = torch.where(mine, input_ids - self.start, 0)
        x = F.embedding(local, self.weight)
        x = x.masked_fill_(~mine.unsqueeze(-1), 0.0)
        return self.group.all_reduce(x)


class VocabParallelLMHead(ParallelModule):
    """The logits of vocabulary rows [start, end), gathered in order on the group's first
    rank (the full [N, vocab] there; this rank's slice elsewhere)."""

    def __init__(self, inner: AnyLinear, vocab_size: int, shard_size: int,
                 group: ParallelGroup) -> None:
        super().__init__()
        self.inner = inner
        self.vocab_size = vocab_size
        self.shard_size = shard_size  # rows per rank; the last rank's slice may be shorter
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.inner(x)
        short = self.shard_size - local.shape[-1]
        if short:  # the gather takes equal shapes
            local = F.pad(local, (0, short))
        parts = self.group.gather(local)
        return local if parts is None else torch.cat(parts, -1)[..., :self.vocab_size]

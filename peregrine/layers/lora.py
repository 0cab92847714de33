"""Batched LoRA on any linear: every row of the step's flat batch carries an adapter slot
(-1: the base model), and a wrapped linear adds, to its base output,

    y[t] += (x[t] A_s^T) B_s^T * scaling_s        for s = slot of row t

for every row at once. Rows are sorted by slot once per step (`LoRABatch`); each linear
then runs one shrink and one expand matmul per segment of equal slot (segmented, as
punica's SGMV), so requests for different adapters and for the base model share the
forward pass. The base linear is whatever runs (float, int8/int4/NF4/FP8, GGUF blocks):
the delta is added on top of its output.

A fused linear (qkv_proj, gate_up_proj) has one slice per PEFT module (q, k, v; gate, up):
slot s packs slice j's A at rows j*r_s .. (j+1)*r_s of `lora_a`, so the shrink of all slices
is one matmul, and each slice's B^T (scaling folded in) expands into its output columns.
CPU: torch matmuls per segment; CUDA: the Triton kernels of kernels/triton/lora.py."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


class LoRABatch:
    """A step's rows grouped by adapter slot: the rows that use one, sorted by slot, and
    the segments (start, end, slot) of that order."""

    def __init__(self, token_slots: torch.Tensor, device: torch.device | None = None) -> None:
        slots = token_slots.cpu().long()
        self.num_tokens = slots.shape[0]
        idx = (slots >= 0).nonzero().squeeze(1)
        order = torch.argsort(slots[idx], stable=True)
        rows, sorted_slots = idx[order], slots[idx][order]
        uniq, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
        bounds = [0, *torch.cumsum(counts, 0).tolist()]
        self.segments: list[tuple[int, int, int]] = [
            (bounds[i], bounds[i + 1], int(s)) for i, s in enumerate(uniq.tolist())]
        self.max_segment = int(counts.max()) if len(counts) else 0
        device = device or token_slots.device
        self.rows = rows.to(device)
        # Every row in order (one adapter for the whole batch): no gather, no scatter.
        self.all_rows_in_order = len(rows) == self.num_tokens and bool(
            (rows == torch.arange(self.num_tokens)).all())
        # The Triton kernels' segment table.
        self.seg_start = torch.tensor(bounds, dtype=torch.int32, device=device)
        self.seg_slot = uniq.to(device=device, dtype=torch.int32)
        self.rows_i32 = self.rows.to(torch.int32)


@dataclass
class LoRAState:
    """What every wrapped linear of one model reads: the current step's batch, or None
    outside the model runner's forward (then the linears are their base)."""

    batch: LoRABatch | None = None

    @contextmanager
    def active(self, batch: LoRABatch | None) -> Iterator[None]:
        """Apply `batch`'s adapters to every wrapped linear inside the block."""
        self.batch = batch
        try:
            yield
        finally:
            self.batch = None


@dataclass
class LoRAFactors:
    """One slice's adapter factors: A [r, in], B [out, r] and the scaling alpha / r."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


class LoRALinear(nn.Module):
    """A linear plus the LoRA deltas of up to `max_loras` resident adapters (slots)."""

    def __init__(self, base: nn.Module, slices: list[int], max_loras: int, max_rank: int,
                 state: LoRAState, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        if sum(slices) != base.out_features:
            raise ValueError(f"slices {slices} do not add up to {base.out_features} outputs")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.slices = list(slices)
        self.offsets = [sum(slices[:j]) for j in range(len(slices))]
        self.max_rank = max_rank
        self.state = state
        n = len(slices)
        self.register_buffer("lora_a", torch.zeros(max_loras, n * max_rank, self.in_features,
                                                   dtype=dtype, device=device), persistent=False)
        for j, size in enumerate(slices):
            self.register_buffer(f"lora_bt{j}", torch.zeros(max_loras, max_rank, size,
                                                            dtype=dtype, device=device),
                                 persistent=False)
        self.ranks = [0] * max_loras  # per slot; 0: no delta here
        self.targets = [[False] * n for _ in range(max_loras)]  # slices each slot targets
        self.rank_tensor = torch.zeros(max_loras, dtype=torch.int32, device=device)

    @property
    def lora_bts(self) -> list[torch.Tensor]:
        """B^T of each slice, [slots, R, out_j]."""
        return [getattr(self, f"lora_bt{j}") for j in range(len(self.slices))]

    def set_slot(self, slot: int, factors: list[LoRAFactors | None]) -> None:
        """Load an adapter's factors (one per slice, None: not targeted) into `slot`."""
        self.clear_slot(slot)
        present = [f for f in factors if f is not None]
        if not present:
            return
        r = max(f.rank for f in present)  # slices of one module may differ in rank
        a = self.lora_a[slot]
        for j, (f, bt) in enumerate(zip(factors, self.lora_bts)):
            if f is None:
                continue
            k = f.rank
            a[j * r:j * r + k].copy_(f.a)
            bt[slot, :k].copy_((f.b * f.scaling).t())
            self.targets[slot][j] = True
        self.ranks[slot] = r
        self.rank_tensor[slot] = r

    def clear_slot(self, slot: int) -> None:
        """Forget `slot`'s adapter (its rows then get no delta from this linear)."""
        self.lora_a[slot].zero_()
        for bt in self.lora_bts:
            bt[slot].zero_()
        self.ranks[slot] = 0
        self.rank_tensor[slot] = 0
        self.targets[slot] = [False] * len(self.slices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.state.batch
        if batch is None or not batch.segments:
            return y
        if x.shape[0] != batch.num_tokens:
            raise RuntimeError(f"a LoRA batch of {batch.num_tokens} rows applied to "
                               f"{x.shape[0]}")
        if x.is_cuda:
            self.add_triton(x, y, batch)
        else:
            self.add_torch(x, y, batch)
        return y

    def add_torch(self, x: torch.Tensor, y: torch.Tensor, batch: LoRABatch) -> None:
        """The segmented delta with torch matmuls, added to y in place."""
        n, bts = len(self.slices), self.lora_bts
        gather = not batch.all_rows_in_order
        xs = x.index_select(0, batch.rows) if gather else x
        delta = y.new_zeros(xs.shape[0], self.out_features) if gather else y
        for start, end, slot in batch.segments:
            r = self.ranks[slot]
            if r == 0:
                continue
            h = xs[start:end] @ self.lora_a[slot, :n * r].t()
            for j, (bt, off, size) in enumerate(zip(bts, self.offsets, self.slices)):
                if self.targets[slot][j]:
                    delta[start:end, off:off + size].addmm_(h[:, j * r:(j + 1) * r],
                                                            bt[slot, :r])
        if gather:
            y.index_add_(0, batch.rows, delta)

    def add_triton(self, x: torch.Tensor, y: torch.Tensor, batch: LoRABatch) -> None:
        """The segmented delta by the Triton kernels, added to y in place."""
        from peregrine.kernels.triton.lora import lora_expand, lora_shrink
        args = (batch.rows_i32, batch.seg_start, batch.seg_slot, self.rank_tensor,
                batch.max_segment)
        h = lora_shrink(x, self.lora_a, *args, n_slices=len(self.slices))
        for j, (bt, off) in enumerate(zip(self.lora_bts, self.offsets)):
            lora_expand(h, bt, y, off, j, *args)

    def extra_repr(self) -> str:
        return (f"slices={self.slices}, max_loras={len(self.ranks)}, "
                f"max_rank={self.max_rank}")

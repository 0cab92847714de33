"""Pipeline stages: the modules that stand in for the embedding and the final norm at a
stage boundary, and the split of a step into micro-batches.

A stage runs the model's own forward over its layers only. On a stage after the first,
`StageInput` takes the embedding's place and receives the residual stream from the stage
before; on a stage before the last, `StageOutput` takes the final norm's place and sends
it on. The stream is sent as one tensor, h = x + residual: the next layer's fused
add-and-norm would compute exactly that sum, so the hand-off changes no bit.

A step's sequences are split into micro-batches that enter the pipeline one after the
other, so stage 1 computes micro-batch 0 while stage 0 computes micro-batch 1."""

from __future__ import annotations

import torch
from torch import nn

from peregrine.attention_backend import AttentionMetadata
from peregrine.layers.comm import ParallelGroup
from peregrine.layers.parallel_linear import ParallelModule


class StageInput(ParallelModule):
    """In place of the embedding: the residual stream [T, hidden] from the previous stage."""

    def __init__(self, world: ParallelGroup, src: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.world, self.src = world, src
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.world.recv((input_ids.shape[0], self.hidden_size), self.dtype,
                               self.device, self.src)


class StageOutput(ParallelModule):
    """In place of the final norm: send the residual stream to the next stage (without
    waiting: this stage moves on to the next micro-batch); `drain` waits for the sends."""

    def __init__(self, world: ParallelGroup, dst: int) -> None:
        super().__init__()
        self.world, self.dst = world, dst
        self.pending: list[tuple[object, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h = (x if residual is None else x + residual).contiguous()
        self.pending.append((self.world.send(h, self.dst), h))
        return h, h

    def drain(self) -> None:
        """Wait until every micro-batch sent has left."""
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


def split_microbatches(query_start_loc: list[int], parts: int) -> list[int]:
    """Sequence boundaries [0, ..., B] cutting the batch into at most `parts` contiguous
    micro-batches of about equal token counts (each at least one sequence)."""
    num_seqs, total = len(query_start_loc) - 1, query_start_loc[-1]
    parts = min(parts, num_seqs)
    bounds = [0]
    for k in range(1, parts):
        lo, hi = bounds[-1] + 1, num_seqs - (parts - k)  # one sequence per part at least
        bounds.append(next((i for i in range(lo, hi + 1)
                            if query_start_loc[i] >= total * k / parts), hi))
    bounds.append(num_seqs)
    return bounds


def reads_ahead(bounds: list[int], meta: AttentionMetadata, block_size: int) -> bool:
    """Whether a micro-batch reads a KV block that a later one writes in this step (a prompt
    sharing a cached block that a sibling fills in the same step): in one forward pass every
    layer writes the whole batch's K/V before attending, so such a step must not be split."""
    if meta.slot_mapping is None or len(bounds) <= 2:
        return False
    qs = meta.query_start_loc
    written_later: set[int] = set()
    for a, b in reversed(list(zip(bounds, bounds[1:]))):
        if written_later:
            widths = [-(-n // block_size) for n in meta.seq_lens[a:b]]
            read = {int(x) for row, w in zip(meta.block_tables[a:b].tolist(), widths)
                    for x in row[:w]}
            if read & written_later:
                return True
        written_later |= set((meta.slot_mapping[qs[a]:qs[b]] // block_size).tolist())
    return False


def microbatch_meta(meta: AttentionMetadata, a: int, b: int,
                    device: torch.device) -> tuple[AttentionMetadata, int, int]:
    """The metadata of sequences [a, b) of `meta`, and their token range [t0, t1)."""
    qs = meta.query_start_loc
    t0, t1 = qs[a], qs[b]
    sub = AttentionMetadata.build(
        [q - t0 for q in qs[a:b + 1]], meta.seq_lens[a:b],
        min(max(meta.num_decodes - a, 0), b - a),
        None if meta.slot_mapping is None else meta.slot_mapping[t0:t1],
        None if meta.block_tables is None else meta.block_tables[a:b], device)
    return sub, t0, t1


def stage_boundaries(model: nn.Module) -> tuple[StageInput | None, StageOutput | None]:
    """The model's stage modules (None where it holds the real embedding / final norm)."""
    inp = model.embed_tokens if isinstance(model.embed_tokens, StageInput) else None
    out = model.norm if isinstance(model.norm, StageOutput) else None
    return inp, out

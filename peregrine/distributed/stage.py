"""One rank's part of a step's forward pass, the same code on the driver and the workers:
the whole batch through the sliced model (tensor parallel), or micro-batch after
micro-batch through this stage's layers (pipeline parallel), the last stage sending the
final hidden states back to the driver."""

from __future__ import annotations

import torch
from torch import nn

from peregrine.attention_backend import AttentionMetadata, LayerCache
from peregrine.distributed.groups import RankGroups
from peregrine.distributed.layout import ParallelLayout
from peregrine.distributed.pipeline import microbatch_meta, stage_boundaries


class StageRunner:
    """Runs this rank's share of a step over its KV pool."""

    def __init__(self, model: nn.Module, kv_caches: list[LayerCache], layout: ParallelLayout,
                 groups: RankGroups, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.layout = layout
        self.groups = groups
        self.device = device
        self.hidden_size = model.config.hidden_size
        self.dtype = next(model.layers.parameters()).dtype
        self.stage_out = stage_boundaries(model)[1]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, bounds: list[int]) -> torch.Tensor | None:
        """The final hidden states [T, hidden] on the driver; None on a worker."""
        caches = self.kv_caches if meta.slot_mapping is not None else None
        lay = self.layout
        if lay.pp == 1:
            hidden = self.model(input_ids, positions, meta, caches)
            return hidden if lay.rank == 0 else None
        sends, spans = [], []
        for a, b in zip(bounds, bounds[1:]):
            sub, t0, t1 = microbatch_meta(meta, a, b, self.device)
            hidden = self.model(input_ids[t0:t1], positions[t0:t1], sub, caches)
            spans.append(t1 - t0)
            if lay.is_last_stage and lay.tp_rank == 0:
                hidden = hidden.contiguous()
                sends.append((self.groups.world.send(hidden, 0), hidden))
        out = None
        if lay.rank == 0:
            src = lay.last_stage_leader
            out = torch.cat([self.groups.world.recv((n, self.hidden_size), self.dtype,
                                                    self.device, src) for n in spans])
        for work, _ in sends:
            work.wait()
        if self.stage_out is not None:
            self.stage_out.drain()
        return out

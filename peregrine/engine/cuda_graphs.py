"""CUDA graphs for pure-decode steps.

A decode step of a small model is a few hundred tiny kernel launches; launched from Python
one by one they take longer than they run. So the model's forward over B decode tokens is
captured once per batch size of a ladder (1, 2, 4, 8, then every multiple of 8 up to
max_num_seqs) and replayed: a step copies its inputs into static buffers, pads them to the
next captured size, and replays one graph. Padded rows write no KV (slot -1) and attend
to nothing (sequence length 0); their outputs are dropped.

Mixed (prefill) steps and batches larger than the ladder run eagerly. The graphs are
captured with the longest possible sequence length in the host metadata, so the split-K
plan of the decode kernel they bake in is valid for every batch that replays them."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from peregrine.attention_backend import AttentionMetadata, LayerCache
from peregrine.models.llama import LlamaForCausalLM


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes to capture: 1, 2, 4, 8, 16, 24, ... up to max_num_seqs (included)."""
    ladder = [1, 2, 4] + list(range(8, max_num_seqs + 1, 8))
    sizes = sorted({s for s in ladder if s < max_num_seqs} | {max_num_seqs})
    return sizes


def padded_size(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest captured size holding `num_seqs` rows; None when none does."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


@dataclass
class DecodeBuffers:
    """Static inputs of the decode graphs, sized for the largest captured batch."""

    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    slot_mapping: torch.Tensor  # [N] int64; -1 on padded rows
    block_tables: torch.Tensor  # [N, max_blocks] int32
    seq_lens: torch.Tensor  # [N] int32; 0 on padded rows
    query_start_loc: torch.Tensor  # [N + 1] int32: 0, 1, 2, ... (one token per sequence)

    @classmethod
    def allocate(cls, max_batch: int, max_blocks: int, device: torch.device) -> "DecodeBuffers":
        def zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)
        return cls(zeros(max_batch, dtype=torch.int64), zeros(max_batch, dtype=torch.int64),
                   torch.full((max_batch,), -1, dtype=torch.int64, device=device),
                   zeros(max_batch, max_blocks, dtype=torch.int32),
                   zeros(max_batch, dtype=torch.int32),
                   torch.arange(max_batch + 1, dtype=torch.int32, device=device))

    def load(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
             size: int) -> None:
        """Copy a decode batch of n <= size sequences into rows [0, n); rows [n, size) become
        padding. Device-to-device copies only: nothing waits for the GPU."""
        n = input_ids.shape[0]
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens_t)
        # Columns past `width` keep stale entries: a kernel reads only the blocks below
        # each row's sequence length, which all lie within `width`.
        self.block_tables[:n, :width].copy_(meta.block_tables)
        self.pad(n, size)

    def pad(self, start: int, size: int) -> None:
        """Make rows [start, size) padding: token 0 at position 0, no slot, no keys."""
        self.input_ids[start:size].zero_()
        self.positions[start:size].zero_()
        self.slot_mapping[start:size].fill_(-1)
        self.seq_lens[start:size].zero_()
        self.block_tables[start:size].zero_()

    def metadata(self, size: int, max_seq_len: int) -> AttentionMetadata:
        """Attention metadata over the first `size` rows. The host lengths say max_seq_len
        for every row: they only size launches (the split-K plan), the kernels read the
        real lengths from `seq_lens`."""
        return AttentionMetadata.build(
            list(range(size + 1)), [max_seq_len] * size, size, self.slot_mapping[:size],
            self.block_tables[:size], self.seq_lens.device,
            query_start_loc_t=self.query_start_loc[:size + 1], seq_lens_t=self.seq_lens[:size])


class DecodeGraphRunner:
    """Captures the model's decode forward for each size of the ladder and replays it."""

    def __init__(self, model: LlamaForCausalLM, kv_caches: list[LayerCache], max_num_seqs: int,
                 max_model_len: int, block_size: int, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_num_seqs)
        max_blocks = -(-max_model_len // block_size)
        self.buffers = DecodeBuffers.allocate(self.sizes[-1], max_blocks, device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def forward(self, size: int) -> torch.Tensor:
        """The model over the first `size` rows of the static buffers (what gets captured)."""
        b = self.buffers
        meta = b.metadata(size, self.max_model_len)
        return self.model(b.input_ids[:size], b.positions[:size], meta, self.kv_caches)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first so that the smaller graphs reuse its memory pool.
        The buffers hold only padding meanwhile, so the warm-up runs write no KV."""
        pool = None
        for size in reversed(self.sizes):
            self.buffers.pad(0, size)
            self.forward(size)  # warm-up: compiles the Triton kernels, primes the allocator
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.forward(size)
            pool = graph.pool()
            self.graphs[size] = (graph, out)
        torch.cuda.synchronize()

    def can_run(self, meta: AttentionMetadata) -> bool:
        """Whether a step is pure decode and small enough for a captured graph."""
        n = meta.num_seqs
        return 0 < n <= self.sizes[-1] and meta.num_decodes == n and meta.num_tokens == n

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
            ) -> torch.Tensor:
        """Hidden states [n, hidden] of a decode batch, by replaying the padded graph. The
        result is a view of the graph's output: use it before the next replay."""
        n = input_ids.shape[0]
        size = padded_size(n, self.sizes)
        self.buffers.load(input_ids, positions, meta, size)
        graph, out = self.graphs[size]
        graph.replay()
        return out[:n]

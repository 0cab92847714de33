"""The model runner: one flat batch per step -> one forward pass -> sampled tokens."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from peregrine.config import EngineConfig
from peregrine.engine.kv_cache import NULL_BLOCK, copy_kv_blocks
from peregrine.engine.sampling_metadata import build_sampling_tensors, prompt_logprob_positions
from peregrine.engine.scheduler import ScheduledBatch
from peregrine.engine.sequence import Sequence
from peregrine.layers.attention import AttentionMetadata, LayerCache, get_attention_backend
from peregrine.layers.sampler import (Sampler, SamplerOutput, SamplingTensors, TokenLogprobs,
                                     prompt_logprobs)
from peregrine.models.llama import LlamaForCausalLM


@dataclass
class ModelInput:
    """The flat batch of one step, ready for the model."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S] rows of the hidden states to sample from
    sample_rows: list[int]  # batch entries those rows belong to


class ModelRunner:
    """Builds batch tensors, runs the model over the KV pool, samples."""

    def __init__(self, config: EngineConfig, model: LlamaForCausalLM,
                 kv_caches: list[LayerCache], block_size: int) -> None:
        self.config = config
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = config.torch_device
        model.set_attention_backend(get_attention_backend(config.attention_backend, self.device))
        self.rng = random.Random(config.seed)  # uniforms of requests without a seed
        self.sampler = Sampler()

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> SamplerOutput:
        """Run one step; the output has one token per sampling entry of the batch."""
        copy_kv_blocks(self.kv_caches, batch.block_copies)
        inp = self.prepare(batch)
        hidden = self.model(inp.input_ids, inp.positions, inp.meta, self.kv_caches)
        prompt_lps = self.prompt_logprobs(batch, hidden)
        if not inp.sample_rows:
            return SamplerOutput([], prompt_logprobs=prompt_lps)
        logits = self.model.compute_logits(hidden[inp.logits_indices])
        seqs = [batch.seqs[i] for i in inp.sample_rows]
        out = self.sampler(logits, self.sampling_tensors(seqs))
        out.prompt_logprobs = prompt_lps
        return out

    def prompt_logprobs(self, batch: ScheduledBatch, hidden: torch.Tensor
                        ) -> dict[int, list[TokenLogprobs]] | None:
        """Logprobs of the prompt tokens this step's prefill chunks predict (seq_id -> list),
        for requests that asked for prompt_logprobs."""
        spans = prompt_logprob_positions(batch)
        if not spans:
            return None
        rows = torch.cat([torch.arange(r, r + n) for _, r, _, n in spans]).to(self.device)
        targets = torch.tensor([t for seq, _, p, n in spans
                                for t in seq.token_ids[p + 1:p + 1 + n]], device=self.device)
        nums = [seq.params.prompt_logprobs for seq, _, _, n in spans for _ in range(n)]
        logits = self.model.compute_logits(hidden[rows])
        flat = prompt_logprobs(logits, targets, nums)
        out, i = {}, 0
        for seq, _, _, n in spans:
            out[seq.seq_id] = flat[i:i + n]
            i += n
        return out

    def prepare(self, batch: ScheduledBatch) -> ModelInput:
        """Flatten the scheduled chunks into token ids, positions and attention metadata."""
        bs = self.block_size
        ids: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        logits_indices: list[int] = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + n])
            starts.append(starts[-1] + n)
            seq_lens.append(start + n)
            if batch.samples(i):
                sample_rows.append(i)
                logits_indices.append(starts[-1] - 1)
        positions = torch.cat([torch.arange(l - (e - s), l) for s, e, l
                               in zip(starts[:-1], starts[1:], seq_lens)])
        max_blocks = max(-(-l // bs) for l in seq_lens)
        table = torch.zeros((len(seq_lens), max_blocks), dtype=torch.int32)
        for i, seq in enumerate(batch.seqs):
            row = seq.block_table[:max_blocks]
            table[i, :len(row)] = torch.tensor(row, dtype=torch.int32)
        table.clamp_(min=0)  # freed (out-of-window) entries are never read: point anywhere
        seq_index = torch.repeat_interleave(torch.arange(len(seq_lens)),
                                            torch.tensor(batch.num_new_tokens))
        slot_mapping = (table[seq_index, positions // bs].long() * bs + positions % bs)
        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=starts, seq_lens=seq_lens, num_decodes=batch.num_decodes,
            slot_mapping=slot_mapping.to(dev), block_tables=table.to(dev),
            query_start_loc_t=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens_t=torch.tensor(seq_lens, dtype=torch.int32, device=dev))
        return ModelInput(torch.tensor(ids, device=dev), positions.to(dev), meta,
                          torch.tensor(logits_indices, device=dev), sample_rows)

    def sampling_tensors(self, seqs: list[Sequence]) -> SamplingTensors:
        """Per-row sampling controls of the sequences being sampled."""
        return build_sampling_tensors(seqs, self.model.config.vocab_size, self.device, self.rng)

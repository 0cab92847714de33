"""The model runner: one flat batch per step -> one forward pass -> sampled tokens."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from peregrine.config import EngineConfig
from peregrine.engine.cuda_graphs import DecodeGraphRunner
from peregrine.engine.kv_cache import NULL_BLOCK, copy_kv_blocks
from peregrine.engine.sampling_metadata import build_sampling_tensors, prompt_logprob_positions
from peregrine.engine.scheduler import ScheduledBatch
from peregrine.engine.sequence import Sequence
from peregrine.layers.attention import AttentionMetadata, LayerCache, get_attention_backend
from peregrine.layers.sampler import (Sampler, SamplerOutput, SamplingTensors, TokenLogprobs,
                                     prompt_logprobs)
from peregrine.models.llama import LlamaForCausalLM
from peregrine.structured.masking import GrammarMasker


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
        self.masker = GrammarMasker(model.config.vocab_size)
        self.graphs: DecodeGraphRunner | None = None
        # Graphs need kernels that read no host values: the Triton backend (auto on CUDA).
        triton = config.attention_backend != "torch"
        if self.device.type == "cuda" and not config.enforce_eager and triton:
            max_len = config.max_model_len or model.config.max_position_embeddings
            self.graphs = DecodeGraphRunner(model, kv_caches, config.max_num_seqs, max_len,
                                            block_size, self.device)
            self.graphs.capture()

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> SamplerOutput:
        """Run one step; the output has one token per sampling entry of the batch."""
        copy_kv_blocks(self.kv_caches, batch.block_copies)
        inp = self.prepare(batch)
        seqs = [batch.seqs[i] for i in inp.sample_rows]
        masks = self.masker.start(seqs)  # grammar masks, None when no sequence is constrained
        hidden = self.forward(inp)
        prompt_lps = self.prompt_logprobs(batch, hidden)
        if not inp.sample_rows:
            return SamplerOutput([], prompt_logprobs=prompt_lps)
        logits = self.model.compute_logits(hidden[inp.logits_indices])
        st = self.sampling_tensors(seqs)
        raw = None
        if masks is not None:
            # Logprobs are those of the model's own distribution, not the masked one.
            raw = logits.clone() if st.logprob_rows is not None else None
            masks.apply_(logits)
        out = self.sampler(logits, st, raw)
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

    def forward(self, inp: ModelInput) -> torch.Tensor:
        """Hidden states of the batch: a CUDA graph replay for a pure decode step that fits
        one, else the eager forward."""
        if self.graphs is not None and self.graphs.can_run(inp.meta):
            return self.graphs.run(inp.input_ids, inp.positions, inp.meta)
        return self.model(inp.input_ids, inp.positions, inp.meta, self.kv_caches)

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the engine's device; on a GPU through pinned memory, without
        waiting for the copy (the step's only sync is reading the sampled tokens)."""
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

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
        num_new = torch.tensor(batch.num_new_tokens)
        seq_index = torch.repeat_interleave(torch.arange(len(seq_lens)), num_new)
        # position of token t = its sequence's first new position + its offset in the chunk
        first_pos = torch.tensor(seq_lens) - num_new
        positions = (first_pos - torch.tensor(starts[:-1]))[seq_index] + torch.arange(starts[-1])
        max_blocks = max(-(-l // bs) for l in seq_lens)
        rows = [seq.block_table[:max_blocks] for seq in batch.seqs]
        table = torch.tensor([r + [0] * (max_blocks - len(r)) for r in rows], dtype=torch.int32)
        table.clamp_(min=0)  # freed (out-of-window) entries are never read: point anywhere
        slot_mapping = (table[seq_index, positions // bs].long() * bs + positions % bs)
        dev = self.to_device
        meta = AttentionMetadata(
            query_start_loc=starts, seq_lens=seq_lens, num_decodes=batch.num_decodes,
            slot_mapping=dev(slot_mapping), block_tables=dev(table),
            query_start_loc_t=dev(torch.tensor(starts, dtype=torch.int32)),
            seq_lens_t=dev(torch.tensor(seq_lens, dtype=torch.int32)))
        return ModelInput(dev(torch.tensor(ids)), dev(positions), meta,
                          dev(torch.tensor(logits_indices)), sample_rows)

    def sampling_tensors(self, seqs: list[Sequence]) -> SamplingTensors:
        """Per-row sampling controls of the sequences being sampled."""
        return build_sampling_tensors(seqs, self.model.config.vocab_size, self.device, self.rng)

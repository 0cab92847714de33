"""The model runner: one flat batch per step -> one forward pass -> sampled tokens."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch

from peregrine.config import EngineConfig
from peregrine.engine.cpu_decode import FusedDecodeRunner, fused_decode_runner
from peregrine.engine.cuda_graphs import DecodeGraphRunner
from peregrine.engine.kv_cache import NULL_BLOCK, copy_kv_blocks
from peregrine.engine.sampling_metadata import build_sampling_tensors, prompt_logprob_positions
from peregrine.engine.scheduler import ScheduledBatch
from peregrine.engine.sequence import Sequence
from peregrine.layers.attention import AttentionMetadata, LayerCache, get_attention_backend
from peregrine.layers.sampler import (Sampler, SamplerOutput, SamplingTensors, TokenLogprobs,
                                     prompt_logprobs)
from peregrine.models.llama import LlamaForCausalLM
from peregrine.spec_decode.proposers import Proposer
from peregrine.spec_decode.verify import verify_drafts
from peregrine.structured.masking import GrammarMasker, StepMasks, grammar_prefix


@dataclass
class ModelInput:
    """The flat batch of one step, ready for the model."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the hidden states to sample from
    sample_rows: list[int]  # batch entries that sample (1 + their drafts rows each)
    num_drafts: list[int]  # draft tokens of each sampling entry (0: no speculation)


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
        self.proposer: Proposer | None = None  # set by the engine when speculating
        self.spec_generator = torch.Generator(self.device).manual_seed(config.seed)
        self.masker = GrammarMasker(model.config.vocab_size)
        self.graphs: DecodeGraphRunner | None = None
        self.fused: FusedDecodeRunner | None = None
        if self.device.type == "cpu" and not config.enforce_eager:
            self.fused = fused_decode_runner(model, kv_caches)
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
        if self.proposer is not None:
            self.propose(batch)
        inp = self.prepare(batch)
        seqs = [batch.seqs[i] for i in inp.sample_rows]
        # Grammar masks (a row per logits row, drafts included); None if nothing is constrained.
        masks = self.masker.start(seqs, inp.num_drafts)
        hidden = self.forward(inp)
        if self.proposer is not None:
            self.proposer.observe(inp)
        prompt_lps = self.prompt_logprobs(batch, hidden)
        if not inp.sample_rows:
            return SamplerOutput([], prompt_logprobs=prompt_lps)
        logits = self.model.compute_logits(hidden[inp.logits_indices])
        if any(inp.num_drafts):
            out = self.sample_with_drafts(logits, seqs, inp.num_drafts, masks)
        else:
            st = self.sampling_tensors(seqs)
            raw = None
            if masks is not None:
                # Logprobs are those of the model's own distribution, not the masked one.
                raw = logits.clone() if st.logprob_rows is not None else None
                masks.apply_(logits)
            out = self.sampler(logits, st, raw)
        out.prompt_logprobs = prompt_lps
        return out

    def propose(self, batch: ScheduledBatch) -> None:
        """Let the proposer fill the draft slots the scheduler reserved, then count the
        drafts in the batch."""
        entries = [(s, k) for s, k in zip(batch.seqs, batch.spec_slots) if k]
        if entries:
            self.proposer.propose([s for s, _ in entries], [k for _, k in entries])
            for seq, _ in entries:
                if seq.matcher is not None:  # drafts the grammar forbids cannot be accepted
                    seq.spec_token_ids = seq.spec_token_ids[:grammar_prefix(
                        seq.matcher, seq.spec_token_ids)]
            batch.add_drafts()

    def sample_with_drafts(self, logits: torch.Tensor, seqs: list[Sequence],
                           num_drafts: list[int], masks: StepMasks | None) -> SamplerOutput:
        """Sample the entries without drafts as usual; verify the others' drafts (logits
        holds 1 + drafts rows per entry, in order)."""
        raw = logits
        if masks is not None:
            logits = logits.clone()
            masks.apply_(logits)
        first = list(itertools.accumulate([0] + [1 + d for d in num_drafts[:-1]]))
        plain = [i for i, d in enumerate(num_drafts) if d == 0]
        spec = [i for i, d in enumerate(num_drafts) if d]
        tokens: list[int] = [0] * len(seqs)
        accepted: list[list[int]] = [[] for _ in seqs]
        logprobs: list[TokenLogprobs | None] | None = None
        if plain:
            rows = torch.tensor([first[i] for i in plain], device=logits.device)
            out = self.sampler(logits[rows], self.sampling_tensors([seqs[i] for i in plain]),
                               raw[rows] if masks is not None else None)
            for i, tok in zip(plain, out.token_ids):
                tokens[i] = tok
            if out.logprobs is not None:
                logprobs = [None] * len(seqs)
                for i, lp in zip(plain, out.logprobs):
                    logprobs[i] = lp
        spec_seqs = [seqs[i] for i in spec]
        rows = torch.tensor([first[i] + j for i in spec for j in range(1 + num_drafts[i])],
                            device=logits.device)
        per_row = [s for s in spec_seqs for _ in range(1 + len(s.spec_token_ids))]
        result = verify_drafts(logits[rows], spec_seqs, self.sampling_tensors(per_row),
                               self.spec_generator)
        for i, toks in zip(spec, result.tokens):
            accepted[i], tokens[i] = toks[:-1], toks[-1]
        return SamplerOutput(tokens, logprobs, accepted_drafts=accepted)

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
        one (GPU), the fused C++ step (CPU, quantized model), else the eager forward."""
        if self.graphs is not None and self.graphs.can_run(inp.meta):
            return self.graphs.run(inp.input_ids, inp.positions, inp.meta)
        if self.fused is not None:
            return self.fused.run(inp.input_ids, inp.positions, inp.meta, self.kv_caches,
                                  inp.meta.num_seqs)
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
        num_drafts: list[int] = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            drafts = len(seq.spec_token_ids)
            ids.extend(seq.token_ids[start:start + n - drafts])
            ids.extend(seq.spec_token_ids)  # verified at the positions after the last token
            starts.append(starts[-1] + n)
            seq_lens.append(start + n)
            if batch.samples(i):
                sample_rows.append(i)
                num_drafts.append(drafts)
                logits_indices.extend(range(starts[-1] - 1 - drafts, starts[-1]))
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
                          dev(torch.tensor(logits_indices)), sample_rows, num_drafts)

    def sampling_tensors(self, seqs: list[Sequence]) -> SamplingTensors:
        """Per-row sampling controls of the sequences being sampled."""
        return build_sampling_tensors(seqs, self.model.config.vocab_size, self.device, self.rng)

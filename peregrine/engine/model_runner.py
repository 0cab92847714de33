"""The model runner: one flat batch per step -> one forward pass -> sampled tokens."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from peregrine.attention_backend import (AttentionMetadata, LayerCache, block_table_tensor,
                                         get_attention_backend, resolve_attention_backend)
from peregrine.config import EngineConfig
from peregrine.distributed.executor import DistributedExecutor
from peregrine.engine.batch import ModelInput, ScheduledBatch
from peregrine.engine.cpu_decode import FusedDecodeRunner, fused_decode_runner
from peregrine.engine.cuda_graphs import DecodeGraphRunner
from peregrine.engine.kv_cache import copy_kv_blocks
from peregrine.lora.manager import LoRAManager
from peregrine.models.llama import LlamaForCausalLM
from peregrine.sampling.sampler import SamplerOutput
from peregrine.sampling.step import StepSampler
from peregrine.spec_decode.proposers import Proposer
from peregrine.structured.masking import GrammarMasker


class ModelRunner:
    """Builds batch tensors, runs the model over the KV pool, samples."""

    def __init__(self, config: EngineConfig, model: LlamaForCausalLM,
                 kv_caches: list[LayerCache], block_size: int,
                 proposer: Proposer | None = None, lora: LoRAManager | None = None,
                 executor: DistributedExecutor | None = None) -> None:
        self.config = config
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = config.torch_device
        backend = resolve_attention_backend(config.attention_backend, self.device, model.config)
        model.set_attention_backend(get_attention_backend(backend, self.device))
        self.sampler = StepSampler(model.config.vocab_size, self.device, config.seed)
        self.proposer = proposer  # sees every batch, to keep a draft model's cache in step
        self.executor = executor  # tensor/pipeline parallel: runs the forward on every rank
        self.masker = GrammarMasker(model.config.vocab_size)
        self.lora = lora  # set: each row runs with its request's adapter (its slot)
        self.graphs: DecodeGraphRunner | None = None
        self.fused: FusedDecodeRunner | None = None
        if self.device.type == "cpu" and not config.enforce_eager:
            self.fused = fused_decode_runner(model, kv_caches)
        # Graphs need kernels that read no host values: the Triton backend (auto on CUDA).
        triton = backend == "triton"
        if (self.device.type == "cuda" and not config.enforce_eager and triton and lora is None
                and not executor and model.supports_cuda_graphs):
            max_len = config.max_model_len or model.config.max_position_embeddings
            self.graphs = DecodeGraphRunner(model, kv_caches, config.max_num_seqs, max_len,
                                            block_size, self.device)
            self.graphs.capture()

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> SamplerOutput:
        """Run one step; the output has one token per sampling entry of the batch."""
        copy_kv_blocks(self.kv_caches, batch.block_copies)
        inp = self.prepare(batch)
        # Grammar masks (a row per logits row, drafts included); None if nothing is constrained.
        masks = self.masker.start([batch.seqs[i].matcher for i in inp.sample_rows],
                                  [batch.drafts[i] for i in inp.sample_rows])
        with nullcontext() if self.lora is None else self.lora.batch(inp.lora_slots):
            if self.executor is None:
                hidden, logits = self.forward(inp), self.model.compute_logits
            else:
                hidden = self.executor.forward(inp.input_ids, inp.positions, inp.meta,
                                               batch.block_copies)
                logits = self.executor.compute_logits
        if self.proposer is not None:
            self.proposer.observe(inp.input_ids, inp.positions, inp.meta)
        return self.sampler(batch, inp, hidden, masks, logits)

    def forward(self, inp: ModelInput) -> torch.Tensor:
        """Hidden states of the batch: a CUDA graph replay for a pure decode step that fits
        one (GPU), the fused C++ step (CPU, quantized model), else the eager forward."""
        if self.graphs is not None and self.graphs.can_run(inp.meta):
            return self.graphs.run(inp.input_ids, inp.positions, inp.meta)
        if self.fused is not None:
            return self.fused.run(inp.input_ids, inp.positions, inp.meta)
        return self.model(inp.input_ids, inp.positions, inp.meta, self.kv_caches)

    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor,
                  meta: AttentionMetadata) -> torch.Tensor:
        """Final hidden states of whole sequences without the KV cache (embeddings), on
        every rank when the model is split."""
        if self.executor is not None:
            return self.executor.forward(input_ids, positions, meta, [])
        return self.model(input_ids, positions, meta)

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
            drafts = len(batch.drafts[i])
            ids.extend(seq.token_ids[start:start + n - drafts])
            ids.extend(batch.drafts[i])  # verified at the positions after the last token
            starts.append(starts[-1] + n)
            seq_lens.append(start + n)
            if batch.samples(i):
                sample_rows.append(i)
                logits_indices.extend(range(starts[-1] - 1 - drafts, starts[-1]))
        num_new = torch.tensor(batch.num_new_tokens)
        seq_index = torch.repeat_interleave(torch.arange(len(seq_lens)), num_new)
        # position of token t = its sequence's first new position + its offset in the chunk
        first_pos = torch.tensor(seq_lens) - num_new
        positions = (first_pos - torch.tensor(starts[:-1]))[seq_index] + torch.arange(starts[-1])
        max_blocks = max(-(-l // bs) for l in seq_lens)
        table = block_table_tensor([seq.block_table for seq in batch.seqs], max_blocks)
        slot_mapping = (table[seq_index, positions // bs].long() * bs + positions % bs)
        dev = self.to_device
        meta = AttentionMetadata.build(starts, seq_lens, batch.num_decodes, slot_mapping, table,
                                       dev)
        lora_slots = None
        if self.lora is not None:
            per_entry = torch.tensor([self.lora.slot_of(s.request.lora_name) for s in batch.seqs])
            lora_slots = per_entry[seq_index]
        return ModelInput(dev(torch.tensor(ids)), dev(positions), meta,
                          dev(torch.tensor(logits_indices)), sample_rows, lora_slots)

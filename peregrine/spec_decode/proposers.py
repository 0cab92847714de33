"""Proposers: who guesses the next tokens a sequence will generate.

Every step, after the scheduler has reserved KV slots for draft tokens, the proposer fills
`seq.spec_token_ids` (at most the reserved count) for those sequences; the target model then
verifies them all in the step's one forward pass.

- `ngram`: prompt lookup, no model.
- `layers:<k>`: self-speculation with the target's first k layers and its LM head. Those
  layers' K/V are the target's own, so the draft writes into the target's cache: the values
  it writes at the draft positions are exactly what the target writes there when verifying.
- `draft:<model>`: a smaller model with the same vocabulary and its own KV pool, addressed
  by the target's block tables (same block ids, its own layer shapes). It runs over every
  target batch too (`observe`), so its cache holds every token the target has computed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from peregrine.engine.sequence import Sequence
from peregrine.layers.attention import AttentionMetadata, LayerCache
from peregrine.spec_decode.ngram import propose_ngram

if TYPE_CHECKING:
    from peregrine.config import EngineConfig
    from peregrine.engine.model_runner import ModelInput, ModelRunner
    from peregrine.models.llama import LlamaForCausalLM


def can_speculate(seq: Sequence) -> bool:
    """Whether verification reproduces this sequence's own sampling exactly: it needs no
    per-position state the verifier does not track (penalties over the tokens before each
    draft, min_tokens still pending, per-token logprobs, beams)."""
    p = seq.params
    return not (p.use_beam_search or p.logprobs is not None or p.repetition_penalty != 1
                or p.frequency_penalty or p.presence_penalty
                or seq.num_output_tokens < p.min_tokens)


class Proposer(Protocol):
    def propose(self, seqs: list[Sequence], max_drafts: list[int]) -> None:
        """Set seq.spec_token_ids (at most max_drafts[i] tokens) for each sequence."""

    def observe(self, inp: "ModelInput") -> None:
        """See the target's batch of this step (a draft model keeps its cache in step)."""


class NgramProposer:
    """Propose what followed the latest earlier occurrence of the sequence's last n tokens."""

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seqs: list[Sequence], max_drafts: list[int]) -> None:
        for seq, k in zip(seqs, max_drafts):
            seq.spec_token_ids = propose_ngram(seq.token_ids, k, self.min_n, self.max_n)

    def observe(self, inp: "ModelInput") -> None:
        pass


class DraftModelProposer:
    """Greedy drafts from a small model, k batched single-token forward passes per step."""

    def __init__(self, model: "LlamaForCausalLM", kv_caches: list[LayerCache], block_size: int,
                 device: torch.device, num_layers: int | None = None,
                 shares_target_cache: bool = False) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.num_layers = num_layers
        self.shares_target_cache = shares_target_cache

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], max_drafts: list[int]) -> None:
        active = [(s, k) for s, k in zip(seqs, max_drafts) if k > 0]
        for seq in seqs:
            seq.spec_token_ids = []
        # Each sequence's last token has no K/V yet; it is the first input.
        tokens = [seq.token_ids[-1] for seq, _ in active]
        step = 0
        while active:
            seqs_now = [s for s, _ in active]
            positions = [s.num_tokens - 1 + step for s in seqs_now]
            hidden = self.model(*self._decode_input(seqs_now, tokens, positions),
                                self.kv_caches, num_layers=self.num_layers)
            drafts = self.model.compute_logits(hidden).argmax(dim=-1).tolist()
            step += 1
            still, tokens = [], []
            for (seq, k), tok in zip(active, drafts):
                seq.spec_token_ids.append(tok)
                if len(seq.spec_token_ids) < k:
                    still.append((seq, k))
                    tokens.append(tok)
            active = still

    def _decode_input(self, seqs: list[Sequence], tokens: list[int], positions: list[int]
                      ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """One token per sequence at `positions`, written to the slots its block table
        reserves (the scheduler reserved them for the drafts)."""
        bs = self.block_size
        dev = self.device
        max_blocks = max(p // bs + 1 for p in positions)
        table = torch.tensor([s.block_table[:max_blocks] + [0] * (max_blocks - len(
            s.block_table[:max_blocks])) for s in seqs], dtype=torch.int32).clamp_(min=0)
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions)]
        seq_lens = [p + 1 for p in positions]
        starts = list(range(len(seqs) + 1))
        meta = AttentionMetadata(
            query_start_loc=starts, seq_lens=seq_lens, num_decodes=len(seqs),
            slot_mapping=torch.tensor(slots, device=dev), block_tables=table.to(dev),
            query_start_loc_t=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens_t=torch.tensor(seq_lens, dtype=torch.int32, device=dev))
        return (torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev), meta)

    @torch.inference_mode()
    def observe(self, inp: "ModelInput") -> None:
        if not self.shares_target_cache:
            # A fresh metadata object: the target's per-step scratch is shaped for its layers.
            meta = AttentionMetadata(
                query_start_loc=inp.meta.query_start_loc, seq_lens=inp.meta.seq_lens,
                num_decodes=inp.meta.num_decodes, slot_mapping=inp.meta.slot_mapping,
                block_tables=inp.meta.block_tables, query_start_loc_t=inp.meta.query_start_loc_t,
                seq_lens_t=inp.meta.seq_lens_t)
            self.model(inp.input_ids, inp.positions, meta, self.kv_caches)


def build_proposer(config: "EngineConfig", runner: "ModelRunner", num_blocks: int
                   ) -> Proposer | None:
    """The proposer `config.speculative` names (None: no speculation)."""
    spec = config.speculative
    if spec is None:
        return None
    if spec == "ngram":
        return NgramProposer(config.ngram_min, config.ngram_max)
    target = runner.model
    if spec.startswith("layers:"):
        k = int(spec.split(":", 1)[1])
        if k >= target.config.num_layers:
            raise ValueError(f"speculative layers:{k} needs fewer layers than the target's "
                             f"{target.config.num_layers}")
        return DraftModelProposer(target, runner.kv_caches, runner.block_size, runner.device,
                                  num_layers=k, shares_target_cache=True)
    return _draft_model_proposer(config, runner, num_blocks, spec.split(":", 1)[1])


def _draft_model_proposer(config: "EngineConfig", runner: "ModelRunner", num_blocks: int,
                          name: str) -> DraftModelProposer:
    from peregrine.engine.kv_cache import allocate_kv_pool
    from peregrine.layers.attention import get_attention_backend
    from peregrine.models.loader import load_model

    device, dtype = config.torch_device, config.torch_dtype
    # A target with random weights (speed work) gets a random draft of the named shape.
    fmt = "dummy" if config.load_format == "dummy" else "auto"
    draft = load_model(name, load_format=fmt, dtype=dtype, device=device, seed=config.seed,
                       max_model_len=config.max_model_len)
    target_vocab = runner.model.config.vocab_size
    if draft.config.vocab_size != target_vocab:
        raise ValueError(f"the draft model {name!r} has a vocabulary of "
                         f"{draft.config.vocab_size} tokens, the target {target_vocab}: "
                         "speculation needs the same tokenizer")
    draft.model.set_attention_backend(get_attention_backend(config.attention_backend, device))
    caches = allocate_kv_pool(draft.config, num_blocks, runner.block_size, dtype, device,
                              config.kv_cache_dtype)
    return DraftModelProposer(draft.model, caches, runner.block_size, device)

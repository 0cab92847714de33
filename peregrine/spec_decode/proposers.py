"""Proposers: who guesses the next tokens a sequence will generate.

Every step, after the scheduler has reserved KV slots for draft tokens, the engine asks the
proposer for drafts (at most the reserved count) from each sequence's tokens and block
table; the target model then verifies them all in the step's one forward pass.

- `ngram`: prompt lookup, no model.
- `layers:<k>`: self-speculation with the target's first k layers and its LM head. Those
  layers' K/V are the target's own, so the draft writes into the target's cache: the values
  it writes at the draft positions are exactly what the target writes there when verifying.
- `draft:<model>`: a smaller model with the same vocabulary and its own KV pool, addressed
  by the target's block tables (same block ids, its own layer shapes). It runs over every
  target batch too (`observe`), so its cache holds every token the target has computed."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from peregrine.attention_backend import (AttentionMetadata, LayerCache, allocate_kv_pool,
                                         block_table_tensor, get_attention_backend)
from peregrine.spec_decode.ngram import propose_ngram

if TYPE_CHECKING:
    from peregrine.config import EngineConfig
    from peregrine.models.llama import LlamaForCausalLM


class Proposer:
    """Guesses draft tokens; sees every target batch."""

    def propose(self, tokens: list[list[int]], block_tables: list[list[int]],
                max_drafts: list[int]) -> list[list[int]]:
        """At most max_drafts[i] drafts after each sequence's tokens (slots are reserved)."""
        raise NotImplementedError

    def observe(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> None:
        """See the target's batch of this step (a draft model keeps its cache in step)."""


class NgramProposer(Proposer):
    """Propose what followed the latest earlier occurrence of the sequence's last n tokens."""

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, tokens: list[list[int]], block_tables: list[list[int]],
                max_drafts: list[int]) -> list[list[int]]:
        return [propose_ngram(t, k, self.min_n, self.max_n) for t, k in zip(tokens, max_drafts)]


class DraftModelProposer(Proposer):
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
    def propose(self, tokens: list[list[int]], block_tables: list[list[int]],
                max_drafts: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in tokens]
        active = [i for i, k in enumerate(max_drafts) if k > 0]
        # Each sequence's last token has no K/V yet; it is the first input.
        last = [tokens[i][-1] for i in active]
        step = 0
        while active:
            positions = [len(tokens[i]) - 1 + step for i in active]
            hidden = self.model(*self._decode_input([block_tables[i] for i in active], last,
                                                    positions),
                                self.kv_caches, num_layers=self.num_layers)
            out = self.model.compute_logits(hidden).argmax(dim=-1).tolist()
            step += 1
            still, last = [], []
            for i, tok in zip(active, out):
                drafts[i].append(tok)
                if len(drafts[i]) < max_drafts[i]:
                    still.append(i)
                    last.append(tok)
            active = still
        return drafts

    def _decode_input(self, block_tables: list[list[int]], tokens: list[int],
                      positions: list[int]
                      ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """One token per sequence at `positions`, in the slots reserved for the drafts."""
        bs, dev = self.block_size, self.device
        table = block_table_tensor(block_tables, max(p // bs + 1 for p in positions))
        slots = [t[p // bs] * bs + p % bs for t, p in zip(block_tables, positions)]
        meta = AttentionMetadata.build(list(range(len(positions) + 1)),
                                       [p + 1 for p in positions], len(positions),
                                       torch.tensor(slots), table, dev)
        return (torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev), meta)

    @torch.inference_mode()
    def observe(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> None:
        if not self.shares_target_cache:
            # Fresh scratch: the target's per-step scratch is shaped for its layers.
            self.model(input_ids, positions, replace(meta, scratch={}), self.kv_caches)


def build_proposer(config: "EngineConfig", target: "LlamaForCausalLM",
                   kv_caches: list[LayerCache], num_blocks: int) -> Proposer | None:
    """The proposer `config.speculative` names (None: no speculation)."""
    spec = config.speculative
    if spec is None:
        return None
    if spec == "ngram":
        return NgramProposer(config.ngram_min, config.ngram_max)
    if spec.startswith("layers:"):
        k = int(spec.split(":", 1)[1])
        if k >= target.config.num_layers:
            raise ValueError(f"speculative layers:{k} needs fewer layers than the target's "
                             f"{target.config.num_layers}")
        return DraftModelProposer(target, kv_caches, config.block_size, config.torch_device,
                                  num_layers=k, shares_target_cache=True)
    return _draft_model_proposer(config, target.config.vocab_size, num_blocks,
                                 spec.split(":", 1)[1])


def _draft_model_proposer(config: "EngineConfig", target_vocab: int, num_blocks: int,
                          name: str) -> DraftModelProposer:
    from peregrine.models.loader import load_model

    device, dtype = config.torch_device, config.torch_dtype
    # A target with random weights (speed work) gets a random draft of the named shape.
    fmt = "dummy" if config.load_format == "dummy" else "auto"
    draft = load_model(name, load_format=fmt, dtype=dtype, device=device, seed=config.seed,
                       max_model_len=config.max_model_len)
    if draft.config.vocab_size != target_vocab:
        raise ValueError(f"the draft model {name!r} has a vocabulary of "
                         f"{draft.config.vocab_size} tokens, the target {target_vocab}: "
                         "speculation needs the same tokenizer")
    draft.model.set_attention_backend(get_attention_backend(config.attention_backend, device,
                                                             draft.config))
    caches = allocate_kv_pool(draft.config, num_blocks, config.block_size, dtype, device,
                              config.kv_cache_dtype)
    return DraftModelProposer(draft.model, caches, config.block_size, device)

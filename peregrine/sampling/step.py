"""One step's sampling, entered once: prompt logprobs, grammar masks applied, the sampler,
and verification of drafts."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from functools import partial

import torch

from peregrine.engine.batch import ModelInput, ScheduledBatch
from peregrine.engine.sequence import Sequence
from peregrine.sampling.metadata import (build_sampling_tensors, prompt_logprob_positions,
                                         spec_generator)
from peregrine.sampling.sampler import (Sampler, SamplerOutput, TokenLogprobs,
                                        prompt_logprobs)
from peregrine.sampling.verify import verify_drafts
from peregrine.structured.masking import StepMasks


class StepSampler:
    """Turns the logits of a step's sampling entries into their tokens."""

    def __init__(self, vocab_size: int, device: torch.device, seed: int) -> None:
        self.device = device
        self.rng = random.Random(seed)  # uniforms of requests without a seed
        self.spec_generator = torch.Generator(device).manual_seed(seed)
        self.sampler = Sampler()
        self.tensors = partial(build_sampling_tensors, vocab_size=vocab_size, device=device,
                               rng=self.rng)  # per-row sampling controls of sequences

    def __call__(self, batch: ScheduledBatch, inp: ModelInput, hidden: torch.Tensor,
                 masks: StepMasks | None,
                 compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> SamplerOutput:
        """One token per sampling entry (after its accepted drafts), and prompt logprobs."""
        prompt_lps = self.prompt_logprobs(batch, hidden, compute_logits)
        if not inp.sample_rows:
            return SamplerOutput([], prompt_logprobs=prompt_lps)
        logits = compute_logits(hidden[inp.logits_indices])
        seqs = [batch.seqs[i] for i in inp.sample_rows]
        drafts = [batch.drafts[i] for i in inp.sample_rows]
        if any(drafts):
            out = self.sample_with_drafts(logits, seqs, drafts, masks)
        else:
            st = self.tensors(seqs)
            raw = None
            if masks is not None:
                # Logprobs are those of the model's own distribution, not the masked one.
                raw = logits.clone() if st.logprob_rows is not None else None
                masks.apply_(logits)
            out = self.sampler(logits, st, raw)
        out.prompt_logprobs = prompt_lps
        return out

    def sample_with_drafts(self, logits: torch.Tensor, seqs: list[Sequence],
                           drafts: list[list[int]], masks: StepMasks | None) -> SamplerOutput:
        """Sample the entries without drafts as usual; verify the others' drafts."""
        raw = logits
        if masks is not None:
            logits = logits.clone()
            masks.apply_(logits)
        num_drafts = [len(d) for d in drafts]
        first = list(itertools.accumulate([0] + [1 + d for d in num_drafts[:-1]]))
        plain = [i for i, d in enumerate(num_drafts) if d == 0]
        spec = [i for i, d in enumerate(num_drafts) if d]
        tokens: list[int] = [0] * len(seqs)
        accepted: list[list[int]] = [[] for _ in seqs]
        logprobs: list[TokenLogprobs | None] | None = None
        if plain:
            rows = torch.tensor([first[i] for i in plain], device=logits.device)
            out = self.sampler(logits[rows], self.tensors([seqs[i] for i in plain]),
                               raw[rows] if masks is not None else None)
            for i, tok in zip(plain, out.token_ids):
                tokens[i] = tok
            if out.logprobs is not None:
                logprobs = [None] * len(seqs)
                for i, lp in zip(plain, out.logprobs):
                    logprobs[i] = lp
        rows = torch.tensor([first[i] + j for i in spec for j in range(1 + num_drafts[i])],
                            device=logits.device)
        per_row = [seqs[i] for i in spec for _ in range(1 + num_drafts[i])]
        result = verify_drafts(logits[rows], [drafts[i] for i in spec],
                               self.tensors(per_row),
                               [spec_generator(seqs[i], logits.device) for i in spec],
                               self.spec_generator)
        for i, toks in zip(spec, result.tokens):
            accepted[i], tokens[i] = toks[:-1], toks[-1]
        return SamplerOutput(tokens, logprobs, accepted_drafts=accepted)

    def prompt_logprobs(self, batch: ScheduledBatch, hidden: torch.Tensor,
                        compute_logits: Callable[[torch.Tensor], torch.Tensor]
                        ) -> dict[int, list[TokenLogprobs]] | None:
        """seq_id -> logprobs of the prompt tokens this step's prefill chunks predict."""
        spans = prompt_logprob_positions(batch)
        if not spans:
            return None
        rows = torch.cat([torch.arange(r, r + n) for _, r, _, n in spans]).to(self.device)
        targets = torch.tensor([t for seq, _, p, n in spans
                                for t in seq.token_ids[p + 1:p + 1 + n]], device=self.device)
        nums = [seq.params.prompt_logprobs for seq, _, _, n in spans for _ in range(n)]
        flat = prompt_logprobs(compute_logits(hidden[rows]), targets, nums)
        out, i = {}, 0
        for seq, _, _, n in spans:
            out[seq.seq_id] = flat[i:i + n]
            i += n
        return out

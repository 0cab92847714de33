"""The sampler: last-position logits of every sequence -> next tokens, vectorized over the batch.

Every step is a batched tensor op over the [B, V] logits, and the optional ones run only
when some row of the batch asks for them:

1. logit_bias, min_tokens (EOS / stop ids to -inf), repetition / frequency / presence
   penalties (token counts built with one scatter_add over the flat token ids of all rows);
2. greedy rows take the argmax of those logits;
3. sampled rows: temperature, softmax, then the min-p, top-k and top-p filters, applied to
   each row's most likely tokens only (a top-k, not a sort of the whole vocabulary, on the
   CPU), then one draw by inverse CDF: the first token whose running probability passes
   u * total, for one uniform u per row. The uniforms are drawn on the host, a seeded
   request's from its own generator, so its tokens depend on its seed and its step only,
   never on what else is in the batch (nor on the device);
4. logprobs (log_softmax of the *raw* logits, as vLLM returns by default): the chosen
   token's logprob and rank plus the top-N, only for the rows that ask.

The only host-device transfer is reading the results out at the end (on the CPU, top-p
also checks whether a row's nucleus outgrew the examined head)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class PenaltyTensors:
    """Repetition / frequency / presence penalties of the rows that use them."""

    output_index: torch.Tensor  # flat row * V + token of every output token of penalized rows
    repetition: torch.Tensor | None = None  # [B] (1.0 where unused); None: no row uses it
    prompt_index: torch.Tensor | None = None  # flat row * V + token of the prompts (repetition)
    frequency: torch.Tensor | None = None  # [B] (0.0 where unused)
    presence: torch.Tensor | None = None  # [B] (0.0 where unused)


@dataclass
class SamplingTensors:
    """Per-row sampling controls of one batch, as tensors on the logits' device."""

    temperature: torch.Tensor  # [B] float; 1.0 on greedy rows (unused there)
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    uniforms: torch.Tensor  # [B] float64 in [0, 1): each sampled row's draw for this step
    top_k: torch.Tensor | None = None  # [B] int64 (vocab size: off; 1 on greedy rows)
    top_k_max: int | None = None  # the largest top_k of a sampled row (known on the host)
    top_p: torch.Tensor | None = None  # [B] float (1.0: off); None: no row uses it
    min_p: torch.Tensor | None = None  # [B] float (0.0: off); None: no row uses it
    plain: torch.Tensor | None = None  # [B] bool: sampled rows with neither top-k nor top-p,
    # set only when other rows use them (those rows then skip the head-based draw)
    penalties: PenaltyTensors | None = None
    logit_bias: tuple[torch.Tensor, torch.Tensor] | None = None  # flat index, value
    banned: torch.Tensor | None = None  # flat row * V + token set to -inf (min_tokens)
    logprob_rows: torch.Tensor | None = None  # [R] rows whose logprobs are returned
    num_logprobs: list[int] | None = None  # [R] top-N of each of those rows (host)

    def select(self, rows: torch.Tensor) -> "SamplingTensors":
        """The filter controls of a subset of rows (to sample those rows again)."""
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]
        return SamplingTensors(
            temperature=self.temperature[rows], greedy=self.greedy[rows], all_greedy=False,
            uniforms=self.uniforms[rows], top_k=pick(self.top_k), top_k_max=self.top_k_max,
            top_p=pick(self.top_p), min_p=pick(self.min_p), plain=pick(self.plain))


@dataclass
class TokenLogprobs:
    """One position's logprobs: the chosen (or prompt) token's, its rank, and the top-N."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class SamplerOutput:
    """Sampled token ids [B] (on the host) and, for the rows that asked, their logprobs."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None] | None = None  # per row; None: no row asked
    prompt_logprobs: dict[int, list[TokenLogprobs]] | None = None  # seq_id -> new positions
    accepted_drafts: list[list[int]] | None = None  # per row: draft tokens accepted before it


def apply_penalties_(logits: torch.Tensor, pt: PenaltyTensors) -> None:
    """In place: repetition penalty over prompt + output tokens (HF/vLLM: logit / p if > 0
    else logit * p), then frequency (per occurrence) and presence (once) penalties over
    output tokens (OpenAI: logit - f * count - p * [count > 0]).

    Only the (row, token) entries that occur are touched: their new values are computed
    from gathered logits and written back (an entry listed twice gets the same value)."""
    B, V = logits.shape
    flat = logits.view(-1)
    index = pt.output_index
    if pt.repetition is not None and pt.prompt_index is not None:
        index = torch.cat([pt.prompt_index, index])
    rows = index // V
    # index_select / scatter_ rather than advanced indexing: the same work, without the
    # parallel-for setup advanced indexing pays even for a few thousand entries on the CPU.
    values = flat.index_select(0, index)
    if pt.repetition is not None:
        rep = pt.repetition[rows]
        values = torch.where(values > 0, values / rep, values * rep)
    if pt.frequency is not None or pt.presence is not None:
        counts = torch.zeros(B * V, dtype=logits.dtype, device=logits.device)
        counts.scatter_add_(0, pt.output_index, torch.ones_like(pt.output_index,
                                                                dtype=logits.dtype))
        count = counts.index_select(0, index)
        if pt.frequency is not None:
            values = values - pt.frequency[rows] * count
        if pt.presence is not None:
            values = values - pt.presence[rows] * (count > 0).to(logits.dtype)
    flat.scatter_(0, index, values)


def apply_logits_processors(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """logit_bias, min_tokens suppression and penalties, on a copy when any applies."""
    if st.logit_bias is None and st.banned is None and st.penalties is None:
        return logits
    logits = logits.clone(memory_format=torch.contiguous_format)
    flat = logits.view(-1)
    if st.logit_bias is not None:
        index, values = st.logit_bias
        flat.scatter_add_(0, index, values)
    if st.banned is not None:
        flat.scatter_(0, st.banned, float("-inf"))
    if st.penalties is not None:
        apply_penalties_(logits, st.penalties)
    return logits


# On the CPU, top-p first looks at this many most likely tokens (a top-k); rows whose nucleus
# is larger look again at 8x as many, and so on up to a sort of the whole row. Sorting
# [64, 49152] costs ~35x a top-128 there.
TOP_P_HEAD = 128


def head_keep(vals: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
              min_p: torch.Tensor | None, full_total: torch.Tensor | float | None = None
              ) -> torch.Tensor:
    """Which of each row's most likely probabilities `vals` [B, K] (sorted, descending)
    survive min-p, then top-k, then top-p: the smallest prefix whose mass, renormalized over
    what min-p and top-k kept, reaches top_p. `full_total` is the mass min-p keeps in the
    whole row (None: `vals` is the whole row). Always a non-empty prefix."""
    keep = torch.ones_like(vals, dtype=torch.bool)
    if min_p is not None:
        keep &= vals >= vals[:, :1] * min_p.unsqueeze(1)
    if top_k is not None:
        keep &= torch.arange(vals.shape[1], device=vals.device) < top_k.unsqueeze(1)
    if top_p is not None:
        kept = vals * keep
        total = kept.sum(dim=-1, keepdim=True)
        if full_total is not None:  # rows no top-k bounds within the head: the row's mass
            if top_k is None:
                total = torch.as_tensor(full_total, dtype=vals.dtype, device=vals.device)
            else:
                total = torch.where((top_k <= vals.shape[1]).unsqueeze(1), total, full_total)
        # Keep a token while the mass strictly before it is below top_p (the first always).
        mass_before = kept.cumsum(dim=-1) - kept
        keep &= mass_before < top_p.unsqueeze(1) * total
    keep[:, 0] = True
    return keep


# Rows longer than this are drawn in two levels: first a block of CDF_BLOCK tokens (by the
# running sum of block totals), then a token inside it. Same draw, a fraction of the work of
# one float64 running sum over the whole vocabulary.
CDF_BLOCK = 256


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One draw per row of the unnormalized `weights` [B, N] for uniforms [B] in [0, 1):
    the first index whose running sum (in float64) passes u * total. Zero weights are never
    drawn."""
    B, N = weights.shape
    if N <= 4 * CDF_BLOCK or N % CDF_BLOCK:
        return _first_past(weights.cumsum(dim=-1, dtype=torch.float64), uniforms.unsqueeze(1))
    blocks = weights.view(B, N // CDF_BLOCK, CDF_BLOCK)
    cdf = blocks.sum(dim=-1, dtype=torch.float64).cumsum(dim=-1)
    block = _first_past(cdf, uniforms.unsqueeze(1)).unsqueeze(1)  # [B, 1]
    before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    rest = uniforms.unsqueeze(1) * cdf[:, -1:] - before  # how far into the chosen block
    inner = blocks.gather(1, block.unsqueeze(2).expand(B, 1, CDF_BLOCK)).squeeze(1)
    inner_cdf = inner.cumsum(dim=-1, dtype=torch.float64)
    # The block total and its own running sum may differ in the last bit: u is rescaled.
    within = _first_past(inner_cdf, (rest / inner_cdf[:, -1:]).clamp(0, 1))
    return block.squeeze(1) * CDF_BLOCK + within


def _first_past(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first index whose cdf [B, N] exceeds u [B, 1] times the row total (kept below the
    total, so trailing zero weights are never reached)."""
    total = cdf[:, -1:]
    target = torch.minimum(u * total, total * (1 - 1e-12))
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)


def sample_filtered(probs: torch.Tensor, st: "SamplingTensors",
                    head_size: int = TOP_P_HEAD) -> torch.Tensor:
    """Draw one token per row of `probs` [B, V] after each row's min-p / top-k / top-p."""
    V = probs.shape[1]
    if st.top_k is None and st.top_p is None:
        return sample_plain(probs, st.min_p, st.uniforms)
    if st.top_p is None:
        k = min(st.top_k_max or V, V)  # exact: no row keeps more than its top_k
    elif probs.is_cuda:
        k = V  # sorting a row is cheap on the GPU, and needs no sync to find out
    else:
        k = min(max(head_size, st.top_k_max or 0), V)
    vals, ids = probs.topk(k, dim=-1) if k < V else sort_descending(probs)
    full_total: torch.Tensor | float | None = None
    if k < V and st.top_p is not None:
        full_total = 1.0
        # The mass min-p keeps in whole rows matters only to rows no top-k bounds (CPU: the
        # check is free).
        unbounded = st.top_k is None or bool((st.top_k > k).any())
        if st.min_p is not None and unbounded:
            full_total = min_p_filter(probs, st.min_p).sum(dim=-1, keepdim=True)
    keep = head_keep(vals, st.top_k, st.top_p, st.min_p, full_total)
    tokens = ids.gather(1, inverse_cdf(vals * keep, st.uniforms).unsqueeze(1)).squeeze(1)
    if full_total is not None:
        # Rows whose nucleus may run past the head (its last entry is still kept) and that
        # no top-k bounds within it look again at a larger head (CPU only: the check is free).
        short = keep[:, -1] & (st.top_p < 1)
        if st.top_k is not None:
            short &= st.top_k > k
        rows = short.nonzero().squeeze(1)
        if len(rows):
            sub = st.select(rows)
            sub.plain = None  # these rows all use top-p
            tokens[rows] = sample_filtered(probs[rows], sub, head_size=k * 8)
    if st.plain is not None:  # sampled rows without top-k / top-p in a batch that has them
        tokens = torch.where(st.plain, sample_plain(probs, st.min_p, st.uniforms), tokens)
    return tokens


def random_sample(probs: torch.Tensor, generators: list[torch.Generator | None],
                  default: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of `probs` [B, V] by inverse CDF, each row's uniform from its own
    torch generator when it has one, else from `default` (for callers that carry torch
    generators, such as the speculative-decoding rejection sampler)."""
    u = torch.rand(len(probs), dtype=torch.float64, device=probs.device, generator=default)
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand((), dtype=torch.float64, device=probs.device, generator=g)
    return inverse_cdf(probs, u)


def sort_descending(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's values and ids by decreasing probability. On the CPU through numpy's
    argsort: torch's CPU sort of [64, 49152] is ~3x slower."""
    if probs.device.type != "cpu":
        return probs.sort(dim=-1, descending=True)
    ids = torch.from_numpy(np.argsort(-probs.numpy(), axis=-1))
    return probs.gather(1, ids), ids


def filtered_probs(probs: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """`probs` [B, V] with what each row's min-p, top-k and top-p drop set to zero (not
    renormalized): the distribution `sample_filtered` draws from, as a whole row."""
    if st.top_k is None and st.top_p is None:
        return probs if st.min_p is None else min_p_filter(probs, st.min_p)
    vals, ids = sort_descending(probs)
    keep = head_keep(vals, st.top_k, st.top_p, st.min_p)
    return torch.zeros_like(probs).scatter_(1, ids, vals * keep)


def min_p_filter(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero the probabilities below min_p times each row's largest."""
    return probs.masked_fill(probs < probs.amax(-1, keepdim=True) * min_p.unsqueeze(1), 0)


def sample_plain(probs: torch.Tensor, min_p: torch.Tensor | None,
                 uniforms: torch.Tensor) -> torch.Tensor:
    """Draw from the whole distribution (after min-p)."""
    return inverse_cdf(probs if min_p is None else min_p_filter(probs, min_p), uniforms)


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows of `logprobs` [R, V]: the logprob of `token_ids` [R], its rank (1 = best;
    ties count against it), and the top-k logprobs and ids."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs >= chosen).sum(dim=-1)
    if k:
        top_lp, top_ids = logprobs.topk(k, dim=-1)
    else:
        rows = len(logprobs)
        top_lp, top_ids = logprobs.new_empty((rows, 0)), token_ids.new_empty((rows, 0))
    return chosen.squeeze(1), ranks, top_lp, top_ids


def logprobs_to_host(token_ids: torch.Tensor, chosen: torch.Tensor, ranks: torch.Tensor,
                     top_lp: torch.Tensor, top_ids: torch.Tensor, nums: list[int]
                     ) -> list[TokenLogprobs]:
    """Read gathered logprobs out as one TokenLogprobs per row, each with its own top-N."""
    toks, lps, rks = token_ids.tolist(), chosen.tolist(), ranks.tolist()
    tl, ti = top_lp.tolist(), top_ids.tolist()
    return [TokenLogprobs(toks[r], lps[r], rks[r], ti[r][:n], tl[r][:n])
            for r, n in enumerate(nums)]


def prompt_logprobs(logits: torch.Tensor, targets: torch.Tensor, nums: list[int]
                    ) -> list[TokenLogprobs]:
    """Logprobs of prompt tokens `targets` [N] under the raw logits [N, V] of the positions
    before them, each with its top-nums[i]."""
    lp = torch.log_softmax(logits, dim=-1)
    gathered = gather_logprobs(lp, targets, max(nums))
    return logprobs_to_host(targets, *gathered, nums)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1) [B]: through the C++ kernel for float32 CPU logits (torch's CPU
    argmax took about 1 ms for 32 rows of a 49k vocabulary, 56 us for one), else torch."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2:
        from peregrine.kernels.cpu import q8_ops
        ops = q8_ops()
        if ops is not None and logits.shape[1] > 0:
            return ops.argmax_rows(logits)
    return logits.argmax(dim=-1)


class Sampler(nn.Module):
    """Logits [B, V] -> token ids [B] (plus logprobs for the rows that ask)."""

    def forward(self, logits: torch.Tensor, st: SamplingTensors,
                raw: torch.Tensor | None = None) -> SamplerOutput:
        """`raw`: the logits logprobs are computed from, when `logits` were already masked
        (structured outputs); by default `logits` themselves."""
        raw = logits if raw is None else raw
        logits = apply_logits_processors(logits, st)
        if st.all_greedy:
            tokens = greedy_tokens(logits)
        else:
            probs = torch.softmax(logits / st.temperature.unsqueeze(1), dim=-1)
            tokens = sample_filtered(probs, st)
            tokens = torch.where(st.greedy, greedy_tokens(logits), tokens)
        if st.logprob_rows is None:
            return SamplerOutput(tokens.tolist())
        rows = st.logprob_rows
        lp = torch.log_softmax(raw[rows], dim=-1)
        chosen_ids = tokens[rows]
        gathered = gather_logprobs(lp, chosen_ids, max(st.num_logprobs))
        token_list = tokens.tolist()
        per_row: list[TokenLogprobs | None] = [None] * len(token_list)
        for r, tl in zip(rows.tolist(), logprobs_to_host(chosen_ids, *gathered,
                                                         st.num_logprobs)):
            per_row[r] = tl
        return SamplerOutput(token_list, per_row)

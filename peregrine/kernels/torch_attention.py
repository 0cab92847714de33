"""The torch attention backend: paged KV write + attention, vectorized, runs anywhere.

Decodes (one query each) run as one batched matmul over K/V gathered through the block
tables. Prefill chunks run one sequence at a time (a step holds few of them, each many
tokens) through scaled_dot_product_attention; a chunk with no cached context attends to
its own fresh K/V without touching the cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peregrine.attention_backend import AttentionMetadata, LayerCache


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, Hkv, D] -> (stored [T, Hkv, D] in int8 / float8_e4m3fn, scale f32 [T, Hkv]):
    one scale per token and head, absmax / 127 (int8) or absmax / 448 (fp8)."""
    top = 127.0 if dtype == torch.int8 else 448.0
    scale = x.float().abs().amax(-1) / top
    y = x.float() / torch.where(scale == 0, 1.0, scale).unsqueeze(-1)
    if dtype == torch.int8:
        y = y.round_().clamp_(-127, 127)
    return y.to(dtype), scale


def write_kv(cache: LayerCache, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store k/v [T, Hkv, D] at flat slots `slot_mapping` [T] (slot = block * size + offset)."""
    hkv, d = k.shape[1], k.shape[2]
    if cache.k_scale is None:
        cache.k.view(-1, hkv, d).index_copy_(0, slot_mapping, k.to(cache.k.dtype))
        cache.v.view(-1, hkv, d).index_copy_(0, slot_mapping, v.to(cache.v.dtype))
        return
    k, ks = quantize_kv(k, cache.k.dtype)
    v, vs = quantize_kv(v, cache.v.dtype)
    cache.k_scale.view(-1, hkv).index_copy_(0, slot_mapping, ks)
    cache.v_scale.view(-1, hkv).index_copy_(0, slot_mapping, vs)
    # copied as raw bytes: index_copy_ has no float8 kernel on CPU
    cache.k.view(torch.uint8).view(-1, hkv, d).index_copy_(0, slot_mapping, k.view(torch.uint8))
    cache.v.view(torch.uint8).view(-1, hkv, d).index_copy_(0, slot_mapping, v.view(torch.uint8))


def gather_kv(cache: LayerCache, block_tables: torch.Tensor, num_blocks: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of each sequence laid out contiguously: [B, num_blocks * block_size, Hkv, D]
    (a quantized cache comes back dequantized, in float32)."""
    table = block_tables[:, :num_blocks].long()
    b = table.shape[0]
    k = cache.k[table].flatten(1, 2)
    v = cache.v[table].flatten(1, 2)
    if cache.k_scale is not None:
        k = k.float() * cache.k_scale[table].flatten(1, 2).unsqueeze(-1)
        v = v.float() * cache.v_scale[table].flatten(1, 2).unsqueeze(-1)
    return k.view(b, -1, *k.shape[-2:]), v.view(b, -1, *v.shape[-2:])


def key_mask(query_pos: torch.Tensor, seq_lens: torch.Tensor, num_keys: int,
             sliding_window: int | None) -> torch.Tensor:
    """Bool [B, Q, K]: key j is visible to a query at position p iff j <= p, j < seq_len and,
    with a window w, j > p - w."""
    j = torch.arange(num_keys, device=query_pos.device)
    p = query_pos.unsqueeze(-1)
    mask = (j <= p) & (j < seq_lens.view(-1, 1, 1))
    if sliding_window is not None:
        mask &= j > p - sliding_window
    return mask


def decode_plan(meta: AttentionMetadata, b: int, block_size: int, sliding_window: int | None,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """For the step's first b (decode) sequences: the flat cache slot of every key position
    [B, L] and an additive mask [B, 1, 1, L] (0 visible, -inf not). Derived once per step
    and shared by all layers."""
    key = ("decode_plan", sliding_window)  # layers with and without a window differ
    plan = meta.scratch.get(key)
    if plan is None:
        seq_lens = meta.seq_lens_t[:b]
        num_keys = max(meta.seq_lens[:b])
        pos = torch.arange(num_keys, device=seq_lens.device)
        table = meta.block_tables[:b, :-(-num_keys // block_size)].long()
        slots = table[:, pos // block_size] * block_size + pos % block_size
        visible = key_mask((seq_lens - 1).view(b, 1), seq_lens, num_keys, sliding_window)
        mask = torch.zeros(visible.shape, dtype=dtype, device=seq_lens.device)
        mask.masked_fill_(~visible, float("-inf"))
        plan = meta.scratch[key] = (slots, mask.view(b, 1, 1, num_keys))
    return plan


# Entries with at most this many query tokens (a last token plus its drafts, when
# speculating) after the decodes run as one padded batch rather than one by one.
SHORT_QUERY = 16


def short_query_plan(meta: AttentionMetadata, lo: int, hi: int, block_size: int,
                     sliding_window: int | None, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For entries lo..hi-1, each with a few queries at the end of its sequence: the flat
    token row of each padded query [B, Q] (padding repeats the last), which of them are
    real [B, Q], the cache slot of every key [B, L] and the additive mask [B, 1, Q, L]."""
    key = ("short_query_plan", sliding_window)
    plan = meta.scratch.get(key)
    if plan is None:
        qs, lens = meta.query_start_loc, meta.seq_lens
        qlen = [qs[i + 1] - qs[i] for i in range(lo, hi)]
        nq, num_keys = max(qlen), max(lens[lo:hi])
        dev = meta.seq_lens_t.device
        j = torch.arange(nq)
        ql = torch.tensor(qlen).unsqueeze(1)
        rows = torch.tensor(qs[lo:hi]).unsqueeze(1) + torch.minimum(j, ql - 1)
        real = (j < ql).to(dev)
        seq_lens = meta.seq_lens_t[lo:hi]
        qpos = (torch.tensor(lens[lo:hi]).unsqueeze(1) - ql + torch.minimum(j, ql - 1)).to(dev)
        pos = torch.arange(num_keys, device=dev)
        table = meta.block_tables[lo:hi, :-(-num_keys // block_size)].long()
        slots = table[:, pos // block_size] * block_size + pos % block_size
        visible = key_mask(qpos, seq_lens, num_keys, sliding_window)  # [B, Q, L]
        mask = torch.zeros(visible.shape, dtype=dtype, device=dev)
        mask.masked_fill_(~visible, float("-inf"))
        plan = meta.scratch[key] = (rows.to(dev), real, slots, mask.unsqueeze(1))
    return plan


def gather_slots(cache: LayerCache, slots: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V at cache `slots` [B, L] as [B, Hkv, L, D] in `dtype` (dequantized if stored so)."""
    hkv, d = cache.k.shape[2], cache.k.shape[3]
    k = cache.k.view(-1, hkv, d)[slots]  # [B, L, Hkv, D]
    v = cache.v.view(-1, hkv, d)[slots]
    if cache.k_scale is not None:
        k = (k.float() * cache.k_scale.view(-1, hkv)[slots].unsqueeze(-1)).to(dtype)
        v = (v.float() * cache.v_scale.view(-1, hkv)[slots].unsqueeze(-1)).to(dtype)
    return k.transpose(1, 2), v.transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float, softcap: float | None, is_causal: bool = False) -> torch.Tensor:
    """scaled_dot_product_attention over [..., H, L, D] (GQA: k/v with fewer heads), or,
    with `softcap`, the same in plain ops with softcap * tanh(s / softcap) on the scores
    (SDPA has no hook between the scores and the mask)."""
    if q.dim() == 3:  # SDPA's fused CPU kernel takes [B, H, L, D] only: 3-D inputs take the
        # math path, 3x slower on a 512-token prefill (the same numbers to ~1e-6)
        m = None if mask is None else mask.unsqueeze(0)
        return attend(q[None], k[None], v[None], m, scale, softcap, is_causal)[0]
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              scale=scale, enable_gqa=True)
    rep = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    scores = torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * (scale / softcap)) * softcap
    if is_causal:
        n, m = scores.shape[-2:]
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
            else scores + mask
    return torch.matmul(torch.softmax(scores.float(), -1).to(q.dtype), v)


class TorchAttentionBackend:
    """Reference backend: correct for every shape, vectorized, used on CPU."""

    supports_softcap = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cache: LayerCache | None, meta: AttentionMetadata, scale: float,
                sliding_window: int | None, softcap: float | None = None) -> torch.Tensor:
        if cache is not None:
            write_kv(cache, k, v, meta.slot_mapping)
        nd = meta.num_decodes
        if nd == meta.num_seqs:  # decode-only step: no scatter into a combined output
            return self._decode(q, cache, meta, scale, sliding_window, softcap)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(q[:nd], cache, meta, scale, sliding_window, softcap)
        qs = meta.query_start_loc
        # Short entries right after the decodes (speculative verification) run batched.
        short = nd
        while (cache is not None and short < meta.num_seqs
               and qs[short + 1] - qs[short] <= SHORT_QUERY
               and meta.seq_lens[short] > qs[short + 1] - qs[short]):  # after context
            short += 1
        if short - nd > 1:
            self._short_queries(q, out, cache, meta, nd, short, scale, sliding_window, softcap)
            nd = short
        for i in range(nd, meta.num_seqs):
            s, e = qs[i], qs[i + 1]
            out[s:e] = self._prefill(q[s:e], k[s:e], v[s:e], cache, meta, i, scale,
                                     sliding_window, softcap)
        return out

    @staticmethod
    def _decode(q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata, scale: float,
                sliding_window: int | None, softcap: float | None) -> torch.Tensor:
        """One query per sequence: [B, Hq, D] against each sequence's paged K/V."""
        b = q.shape[0]
        slots, mask = decode_plan(meta, b, cache.block_size, sliding_window, q.dtype)
        k, v = gather_slots(cache, slots, q.dtype)
        out = attend(q.unsqueeze(2), k, v, mask, scale, softcap)  # [B, Hq, 1, D]
        return out.squeeze(2)

    @staticmethod
    def _short_queries(q: torch.Tensor, out: torch.Tensor, cache: LayerCache,
                       meta: AttentionMetadata, lo: int, hi: int, scale: float,
                       sliding_window: int | None, softcap: float | None) -> None:
        """Entries lo..hi-1 (a few queries each, after cached context) as one padded batch."""
        rows, real, slots, mask = short_query_plan(meta, lo, hi, cache.block_size,
                                                   sliding_window, q.dtype)
        k, v = gather_slots(cache, slots, q.dtype)
        qb = q[rows].transpose(1, 2)  # [B, Hq, Q, D]
        res = attend(qb, k, v, mask, scale, softcap).transpose(1, 2)  # [B, Q, Hq, D]
        out[rows[real]] = res[real]

    @staticmethod
    def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache | None,
                 meta: AttentionMetadata, i: int, scale: float,
                 sliding_window: int | None, softcap: float | None) -> torch.Tensor:
        """A chunk of one sequence: queries attend to cached context plus themselves."""
        n = q.shape[0]
        seq_len = meta.seq_lens[i]
        context = seq_len - n
        if context > 0:
            nblocks = -(-seq_len // cache.block_size)
            k, v = gather_kv(cache, meta.block_tables[i:i + 1], nblocks)
            k, v = k[0, :seq_len].to(q.dtype), v[0, :seq_len].to(q.dtype)
        qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, n, D]
        if context == 0 and (sliding_window is None or seq_len <= sliding_window):
            out = attend(qt, kt, vt, None, scale, softcap, is_causal=True)
        else:
            pos = torch.arange(context, seq_len, device=q.device).view(1, n)
            lens = torch.tensor([seq_len], device=q.device)
            mask = key_mask(pos, lens, seq_len, sliding_window)  # [1, n, seq_len]
            out = attend(qt, kt, vt, mask, scale, softcap)
        return out.transpose(0, 1)

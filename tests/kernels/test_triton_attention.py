"""The Triton attention backend matches the torch reference backend: KV write, paged decode
(split-K), chunked prefill over cached prefixes, sliding windows, GQA, quantized KV, logit
soft-capping.

On a machine without a GPU every kernel runs under Triton's interpreter (see conftest)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch

from peregrine.attention_backend import AttentionMetadata, LayerCache
from peregrine.kernels.torch_attention import TorchAttentionBackend
from peregrine.kernels.triton.decode_attention import DecodeTiles, split_plan
from peregrine.kernels.triton.kv_write import write_kv
from peregrine.kernels.triton.prefill_attention import PrefillTiles
from peregrine.kernels.triton_attention import TritonAttentionBackend, launch_plan

QUANT_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
# Small tiles and eager splitting, so short test sequences walk several key tiles, several
# query tiles and several decode splits (merged by the second decode kernel).
SMALL_DECODE = DecodeTiles(block_n=16, target_programs=32)
SMALL_PREFILL = PrefillTiles(block_m=32, block_n=16)


@dataclass
class Case:
    """A flat batch: decodes (context, 1) first, then prefill chunks (context, new)."""

    hq: int
    hkv: int
    d: int
    block_size: int
    decodes: list[int]  # context length before the one new token
    prefills: list[tuple[int, int]]  # (cached context, chunk length)
    window: int | None = None
    kv: str = "auto"  # auto | int8 | fp8
    dtype: torch.dtype = torch.float32
    pad_decodes: int = 0  # CUDA-graph style padded decode rows (slot -1, seq_len 0)
    softcap: float | None = None  # Gemma 2's cap * tanh(scores / cap)
    tiles: tuple[DecodeTiles, PrefillTiles] = field(default=(SMALL_DECODE, SMALL_PREFILL))


def fake_quant(x: torch.Tensor, kv: str) -> torch.Tensor:
    """x after a round trip through the quantized cache format (per token and head)."""
    amax = x.float().abs().amax(-1, keepdim=True)
    scale = amax / (127.0 if kv == "int8" else 448.0)
    y = x.float() / torch.where(scale > 0, scale, torch.ones_like(scale))
    if kv == "int8":
        y = y.round().clamp(-127, 127)
    else:
        y = y.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    return (y * scale).to(x.dtype)


def dequantize(cache: LayerCache, dtype: torch.dtype) -> LayerCache:
    """A compute-dtype copy of a cache (dequantized when it stores int8/fp8)."""
    if cache.k_scale is None:
        return LayerCache(cache.k.clone(), cache.v.clone())
    return LayerCache((cache.k.float() * cache.k_scale[..., None]).to(dtype),
                      (cache.v.float() * cache.v_scale[..., None]).to(dtype))


def build(case: Case, device: torch.device, seed: int = 0):
    """Random q/k/v of the new tokens, a random cache holding each sequence's context in
    shuffled blocks, and the step's metadata."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    bs = case.block_size
    specs = [(c, 1) for c in case.decodes] + list(case.prefills)
    need = sum(-(-(c + n) // bs) for c, n in specs)
    num_blocks = need + 3
    free = list(range(num_blocks))
    rng.shuffle(free)
    max_blocks = max(-(-(c + n) // bs) for c, n in specs)
    tables, slots, starts, lens = [], [], [0], []
    for c, n in specs:
        row = [free.pop() for _ in range(-(-(c + n) // bs))]
        tables.append(row + [0] * (max_blocks - len(row)))
        slots += [row[p // bs] * bs + p % bs for p in range(c, c + n)]
        starts.append(starts[-1] + n)
        lens.append(c + n)
    nd = len(case.decodes)
    if case.pad_decodes:  # padded rows sit after the real decodes, before the prefills
        p = case.pad_decodes
        tables = tables[:nd] + [[0] * max_blocks] * p + tables[nd:]
        slots = slots[:nd] + [-1] * p + slots[nd:]
        lens = lens[:nd] + [0] * p + lens[nd:]
        starts = list(range(nd + p + 1)) + [s + p for s in starts[nd + 1:]]
        nd += p
    t = starts[-1]
    shape = (num_blocks, bs, case.hkv, case.d)
    if case.kv == "auto":
        cache = LayerCache(torch.randn(shape, generator=g).to(case.dtype),
                           torch.randn(shape, generator=g).to(case.dtype))
    else:
        def stored() -> torch.Tensor:
            if case.kv == "int8":
                return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
            return (torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)

        cache = LayerCache(stored(), stored(),
                           k_scale=torch.rand(shape[:3], generator=g) * 0.02 + 1e-3,
                           v_scale=torch.rand(shape[:3], generator=g) * 0.02 + 1e-3)
    q = torch.randn(t, case.hq, case.d, generator=g).to(case.dtype)
    # k and v as the model makes them: views into one fused projection output
    qkv = torch.randn(t, 2 * case.hkv * case.d + 8, generator=g).to(case.dtype)
    k = qkv[:, :case.hkv * case.d].view(t, case.hkv, case.d)
    v = qkv[:, case.hkv * case.d:2 * case.hkv * case.d].view(t, case.hkv, case.d)
    meta = AttentionMetadata(
        query_start_loc=starts, seq_lens=lens, num_decodes=nd,
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor(tables, dtype=torch.int32),
        query_start_loc_t=torch.tensor(starts, dtype=torch.int32),
        seq_lens_t=torch.tensor(lens, dtype=torch.int32))
    return q, k, v, cache, meta


def to(device, *xs):
    out = []
    for x in xs:
        if isinstance(x, LayerCache):
            x = LayerCache(*(None if t is None else t.to(device)
                             for t in (x.k, x.v, x.k_scale, x.v_scale)))
        elif isinstance(x, AttentionMetadata):
            x = AttentionMetadata(x.query_start_loc, x.seq_lens, x.num_decodes,
                                  *(t.to(device) for t in (x.slot_mapping, x.block_tables,
                                                           x.query_start_loc_t, x.seq_lens_t)))
        else:
            x = x.to(device)
        out.append(x)
    return out


def tolerance(dtype: torch.dtype) -> dict:
    # float64: the reference's decode path takes its softmax in float32.
    return {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float64: dict(atol=1e-6, rtol=0),
            torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}[dtype]


def run_both(case: Case, device: torch.device, seed: int = 0):
    """(triton output, triton cache, reference output, reference cache) of one step."""
    q, k, v, cache, meta = build(case, device, seed)
    scale = case.d ** -0.5
    decode_tiles, prefill_tiles = case.tiles
    backend = TritonAttentionBackend(device, decode_tiles, prefill_tiles)
    dq, dk, dv, dcache, dmeta = to(device, q, k, v, cache, meta)
    out = backend.forward(dq, dk, dv, dcache, dmeta, scale, case.window, case.softcap)
    # The reference attends over what the quantized cache holds: the dequantized context,
    # and for decodes their own token after its round trip through the cache (a prefill
    # chunk attends to its own fresh K/V).
    ref_cache = dequantize(cache, case.dtype)
    ref_k, ref_v = k.clone(), v.clone()
    if case.kv != "auto":
        nd = meta.num_decodes
        ref_k[:nd], ref_v[:nd] = fake_quant(k[:nd], case.kv), fake_quant(v[:nd], case.kv)
    real = meta.slot_mapping >= 0
    ref_meta = meta
    if case.pad_decodes:  # the reference backend knows nothing of padding: drop those rows
        ref_meta, q, ref_k, ref_v = unpad(meta, case), q[real], ref_k[real], ref_v[real]
    ref = TorchAttentionBackend().forward(q, ref_k, ref_v, ref_cache, ref_meta, scale,
                                          case.window, case.softcap)
    return out.cpu(), dcache, ref, ref_cache, real, meta


def unpad(meta: AttentionMetadata, case: Case) -> AttentionMetadata:
    real = [i for i, n in enumerate(meta.seq_lens) if n > 0]
    lens = [meta.seq_lens[i] for i in real]
    qlens = [meta.query_start_loc[i + 1] - meta.query_start_loc[i] for i in real]
    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    return AttentionMetadata(
        query_start_loc=starts, seq_lens=lens, num_decodes=len(case.decodes),
        slot_mapping=meta.slot_mapping[meta.slot_mapping >= 0],
        block_tables=meta.block_tables[real], query_start_loc_t=torch.tensor(starts).int(),
        seq_lens_t=torch.tensor(lens).int())


CASES = {
    # GQA 1, head dim 64, blocks of 16: decodes, a fresh prompt, a chunk after a prefix hit
    "gqa1-d64-bs16": Case(2, 2, 64, 16, decodes=[17, 40, 1], prefills=[(0, 30), (32, 12)]),
    # GQA 3 (SmolLM2's 9/3), head dim 128, blocks of 8, ragged chunks
    "gqa3-d128-bs8": Case(6, 2, 128, 8, decodes=[8, 3, 60], prefills=[(16, 20), (0, 9), (5, 1)]),
    "gqa4-d64-bs8-window": Case(8, 2, 64, 8, decodes=[30, 5, 12], prefills=[(24, 17), (0, 33)],
                                window=10),
    "gqa4-d128-bs16-window-int8": Case(4, 1, 128, 16, decodes=[50, 2], prefills=[(40, 21), (0, 18)],
                                       window=24, kv="int8"),
    "gqa3-d64-bs16-int8": Case(6, 2, 64, 16, decodes=[33, 7], prefills=[(16, 25), (0, 12)],
                               kv="int8"),
    "gqa1-d64-bs8-fp8": Case(2, 2, 64, 8, decodes=[21, 64], prefills=[(8, 14)], kv="fp8"),
    "decode-only-long": Case(8, 2, 64, 8, decodes=[150, 3, 97, 64], prefills=[], window=40),
    "prefill-only": Case(6, 2, 64, 16, decodes=[], prefills=[(0, 45), (48, 3), (0, 1)]),
    "padded-decodes": Case(4, 2, 64, 8, decodes=[20, 9], prefills=[(8, 10)], pad_decodes=3),
    "gpu-tiles": Case(8, 2, 128, 16, decodes=[130, 20], prefills=[(64, 70)],
                      tiles=(DecodeTiles(), PrefillTiles())),
    # Triton's CPU interpreter multiplies bf16 tiles wrongly (tl.dot on raw bits); float16
    # takes the same low-precision path there, bf16 is checked where a GPU runs the tests.
    "float16": Case(8, 2, 64, 16, decodes=[40, 9], prefills=[(16, 19)], dtype=torch.float16),
    "bf16": Case(8, 2, 64, 16, decodes=[40, 9], prefills=[(16, 19)], dtype=torch.bfloat16),
    "float64": Case(6, 2, 64, 8, decodes=[25, 4], prefills=[(8, 15)], window=12,
                    dtype=torch.float64),
    # scores of std ~1 against a cap of 1.5: the cap bends most of them (split decodes too)
    "softcap-window": Case(4, 2, 64, 8, decodes=[30, 5], prefills=[(16, 13)], window=10,
                           softcap=1.5),
    "softcap-float64": Case(4, 2, 32, 8, decodes=[20], prefills=[(8, 9)], softcap=0.5,
                            dtype=torch.float64),
}


@pytest.mark.parametrize("name", list(CASES))
def test_backend_matches_torch_reference(name, device):
    case = CASES[name]
    if case.dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly; runs on a GPU")
    out, cache, ref, ref_cache, real, meta = run_both(case, device)
    torch.testing.assert_close(out[real], ref, **tolerance(case.dtype))
    if case.kv == "auto":  # the cache holds exactly what the reference wrote
        assert torch.equal(cache.k.cpu(), ref_cache.k) and torch.equal(cache.v.cpu(), ref_cache.v)
    if case.pad_decodes:  # padded rows: zero output, and nothing written for them
        assert torch.count_nonzero(out[~real]) == 0


@pytest.mark.parametrize("window,softcap", [(None, None), (7, None), (7, 1.5)])
def test_no_cache_prefill_matches_reference(window, softcap, device):
    """Without a KV cache (eval), plain causal varlen attention over the new tokens."""
    g = torch.Generator().manual_seed(3)
    lens = [37, 1, 16, 50]
    meta = AttentionMetadata.prefill_only(lens)
    t = sum(lens)
    q, k, v = (torch.randn(t, h, 64, generator=g) for h in (6, 2, 2))
    ref = TorchAttentionBackend().forward(q, k, v, None, meta, 0.125, window, softcap)
    backend = TritonAttentionBackend(device, SMALL_DECODE, SMALL_PREFILL)
    dq, dk, dv, dmeta_t = to(device, q, k, v, meta.query_start_loc_t)
    dmeta = AttentionMetadata(meta.query_start_loc, meta.seq_lens,
                              query_start_loc_t=dmeta_t, seq_lens_t=meta.seq_lens_t.to(device))
    out = backend.forward(dq, dk, dv, None, dmeta, 0.125, window, softcap)
    torch.testing.assert_close(out.cpu(), ref, **tolerance(torch.float32))


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_quantized_write_stores_absmax_scaled_values(kv, device):
    """Per token and kv head: scale = absmax / 127 (int8) or / 448 (fp8), stored =
    round(x / scale) (ties to even, like torch.round) or x / scale cast to e4m3fn."""
    g = torch.Generator().manual_seed(5)
    t, h, d, bs, nb = 9, 3, 64, 4, 6
    x = torch.randn(t, h, d, generator=g) * torch.logspace(-3, 2, t).view(t, 1, 1)
    x[0, 1] = 0.0  # an all-zero row gets scale 0 and stores zeros
    x[1, 0, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # exact .5 ties (int8 scale 1.0)
    x[1, 0, 4:] = x[1, 0, 4:].clamp(-100, 100)
    slots = torch.tensor([5, 0, 23, 7, -1, 12, 3, 18, 9])
    qdt = QUANT_DTYPES[kv]
    cache = LayerCache(torch.zeros(nb, bs, h, d, dtype=qdt), torch.zeros(nb, bs, h, d, dtype=qdt),
                       torch.zeros(nb, bs, h), torch.zeros(nb, bs, h))
    dcache, dx, dslots = to(device, cache, x, slots)
    write_kv(dcache, dx, -dx, dslots)
    qmax = 127.0 if kv == "int8" else 448.0
    scale = x.abs().amax(-1) / qmax
    y = x / torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]
    stored = y.round().clamp(-127, 127).to(qdt) if kv == "int8" else y.clamp(-448, 448).to(qdt)
    flat_k = dcache.k.cpu().view(-1, h, d)
    flat_v = dcache.v.cpu().view(-1, h, d)
    real = slots >= 0
    assert torch.equal(flat_k[slots[real]].float(), stored[real].float())
    assert torch.equal(flat_v[slots[real]].float(), -stored[real].float())
    assert torch.equal(dcache.k_scale.cpu().view(-1, h)[slots[real]], scale[real])
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[slots[real]] = False
    assert torch.count_nonzero(flat_k[untouched].float()) == 0  # slot -1 wrote nothing


def test_write_copies_rows_in_compute_dtype(device):
    g = torch.Generator().manual_seed(6)
    k, v = torch.randn(2, 7, 3, 16, generator=g)
    slots = torch.tensor([3, 9, -1, 0, 15, 4, 11])
    cache = LayerCache(torch.zeros(4, 4, 3, 16), torch.zeros(4, 4, 3, 16))
    dcache, dk, dv, dslots = to(device, cache, k, v, slots)
    write_kv(dcache, dk, dv, dslots)
    real = slots >= 0
    assert torch.equal(dcache.k.cpu().view(-1, 3, 16)[slots[real]], k[real])
    assert torch.equal(dcache.v.cpu().view(-1, 3, 16)[slots[real]], v[real])
    assert torch.count_nonzero(dcache.k.cpu()) == real.sum() * 3 * 16


@pytest.mark.parametrize("num_seqs,kv_heads,max_len", [(1, 8, 8192), (4, 2, 100), (256, 8, 300),
                                                       (3, 1, 1), (64, 8, 4096)])
def test_split_plan_covers_the_longest_sequence(num_seqs, kv_heads, max_len):
    tiles = DecodeTiles(block_n=64, target_programs=528)
    partition, splits = split_plan(num_seqs, kv_heads, max_len, tiles)
    assert partition % tiles.block_n == 0
    assert (splits - 1) * partition < max_len <= splits * partition
    if num_seqs * kv_heads >= tiles.target_programs:
        assert splits == 1  # enough parallelism already
    else:  # about target_programs programs, unless the sequence is too short to split
        programs = num_seqs * kv_heads * splits
        assert programs <= 2 * tiles.target_programs
        assert programs >= tiles.target_programs // 2 or partition == tiles.block_n


def test_launch_plan_reads_host_metadata_only():
    meta = AttentionMetadata(query_start_loc=[0, 1, 2, 7, 10], seq_lens=[30, 12, 5, 40],
                             num_decodes=2)  # no device tensors at all
    plan = launch_plan(meta, has_cache=True)
    assert (plan.num_decodes, plan.max_decode_len, plan.max_prefill_query_len) == (2, 30, 5)
    plan = launch_plan(meta, has_cache=False)  # no cache: everything is a prefill
    assert (plan.num_decodes, plan.max_prefill_query_len) == (0, 5)

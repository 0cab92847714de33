"""A quantized KV cache stores one byte per value plus a scale per token and head, and
attention over it stays close to attention over a float cache."""

from __future__ import annotations

import pytest
import torch

from peregrine.attention_backend import AttentionMetadata, allocate_kv_pool
from peregrine.engine.kv_cache import kv_dtype_bytes
from peregrine.kernels.torch_attention import TorchAttentionBackend, gather_kv, write_kv
from peregrine.models.config import ModelConfig

CFG = ModelConfig(architecture="llama", vocab_size=100, hidden_size=64, intermediate_size=128,
                  num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16)


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_pool_layout(kv):
    (cache,) = allocate_kv_pool(CFG, 5, 4, torch.float32, torch.device("cpu"), kv)
    assert cache.k.shape == (5, 4, 2, 16) and cache.k.element_size() == 1
    assert cache.k_scale.shape == (5, 4, 2) and cache.k_scale.dtype == torch.float32
    assert kv_dtype_bytes(kv, torch.float32, 16) == 1 + 4 / 16


@pytest.mark.parametrize("kv,rel", [("int8", 0.5 / 127), ("fp8", 2 ** -4)])
def test_write_then_gather_round_trips(kv, rel):
    (cache,) = allocate_kv_pool(CFG, 4, 4, torch.float32, torch.device("cpu"), kv)
    k, v = torch.randn(6, 2, 16), torch.randn(6, 2, 16) * 3
    slots = torch.tensor([0, 1, 2, 5, 6, 13])
    write_kv(cache, k, v, slots)
    gk, gv = gather_kv(cache, torch.arange(4, dtype=torch.int32).view(1, 4), 4)
    for got, want in ((gk[0, slots], k), (gv[0, slots], v)):
        amax = want.abs().amax(-1, keepdim=True)
        # int8: half a step of absmax/127; fp8: relative 2^-4, subnormals absolute
        bound = (amax * rel if kv == "int8" else want.abs() * rel + amax / 448 * 2 ** -9)
        assert ((got - want).abs() <= bound + 1e-6).all()
    assert float(cache.k_scale.view(-1, 2)[slots[0], 0]) == pytest.approx(
        float(k[0, 0].abs().max() / (127 if kv == "int8" else 448)))


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_decode_attention_close_to_float(kv):
    g = torch.Generator().manual_seed(0)
    lens = [9, 30, 17]
    caches = {d: allocate_kv_pool(CFG, 24, 4, torch.float32, torch.device("cpu"), d)[0]
              for d in ("auto", kv)}
    table = torch.arange(24, dtype=torch.int32).view(3, 8)
    for i, n in enumerate(lens):  # fill each sequence's context
        k, v = torch.randn(n, 2, 16, generator=g), torch.randn(n, 2, 16, generator=g)
        slots = (table[i].long().repeat_interleave(4)[:n] * 4 + torch.arange(n) % 4)
        for c in caches.values():
            write_kv(c, k, v, slots)
    q = torch.randn(3, 4, 16, generator=g)
    k_new, v_new = torch.randn(3, 2, 16, generator=g), torch.randn(3, 2, 16, generator=g)
    seq_lens = [n + 1 for n in lens]
    slot = torch.tensor([int(table[i, n // 4]) * 4 + n % 4 for i, n in enumerate(lens)])
    meta = AttentionMetadata(query_start_loc=[0, 1, 2, 3], seq_lens=seq_lens, num_decodes=3,
                             slot_mapping=slot, block_tables=table,
                             seq_lens_t=torch.tensor(seq_lens, dtype=torch.int32))
    out = {d: TorchAttentionBackend().forward(q, k_new, v_new, c, meta, 0.25, None)
           for d, c in caches.items()}
    err = (out[kv] - out["auto"]).abs().max()
    assert err < (0.03 if kv == "int8" else 0.1)
    assert err > 0  # the quantized cache really is lossy

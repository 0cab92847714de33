"""Forked sequences share every block by reference count; the partly filled last block is
copied, K/V and all, on the first write into it (copy-on-write), and only then."""

from __future__ import annotations

import torch

from peregrine.attention_backend import LayerCache
from peregrine.engine.kv_cache import KVCacheManager, copy_kv_blocks
from peregrine.engine.sequence import Request, Sequence
from peregrine.sampling_params import SamplingParams


def running_seq(kv: KVCacheManager, num_tokens: int) -> Sequence:
    """A sequence whose first num_tokens tokens are computed, plus one new token."""
    params = SamplingParams(temperature=0)
    req = Request("r", None, list(range(100, 100 + num_tokens)), params)
    seq = Sequence(req, 0, params)
    assert kv.allocate(seq, num_tokens)
    seq.num_computed_tokens = num_tokens
    seq.token_ids.append(7)
    return seq


def test_fork_shares_blocks_and_copies_the_partial_block_on_write():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    parent = running_seq(kv, 10)  # blocks: 2 full + 1 holding 2 tokens
    child = parent.fork(1)
    kv.fork(parent, child)
    assert child.block_table == parent.block_table
    assert all(kv.ref_counts[b] == 2 for b in parent.block_table)
    kv.check_invariants([parent, child])

    partial = parent.block_table[2]
    free_before = kv.num_free_blocks
    assert kv.allocate(parent, 1)  # writes position 10, inside the shared partial block
    assert parent.block_table[:2] == child.block_table[:2]  # full blocks stay shared
    assert parent.block_table[2] != partial and child.block_table[2] == partial
    assert kv.ref_counts[partial] == 1 and kv.num_free_blocks == free_before - 1
    assert kv.take_pending_copies() == [(partial, parent.block_table[2])]
    assert kv.allocate(child, 1)  # now the only holder: writes in place, no copy
    assert child.block_table[2] == partial and kv.take_pending_copies() == []
    kv.check_invariants([parent, child])

    kv.free(parent)
    kv.free(child)
    kv.check_invariants([])
    assert kv.num_free_blocks == kv.num_blocks


def test_fork_at_a_block_boundary_copies_nothing():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    parent = running_seq(kv, 8)
    child = parent.fork(1)
    kv.fork(parent, child)
    assert kv.allocate(parent, 1) and kv.allocate(child, 1)
    assert kv.take_pending_copies() == []
    assert parent.block_table[:2] == child.block_table[:2]
    assert parent.block_table[2] != child.block_table[2]
    kv.check_invariants([parent, child])


def test_copy_on_write_counts_the_copy_when_checking_room():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    parent = running_seq(kv, 6)  # both blocks, the second partial
    child = parent.fork(1)
    kv.fork(parent, child)
    assert kv.num_free_blocks == 0
    assert not kv.can_allocate(parent, 1)  # the write needs a copy of the shared block
    assert not kv.allocate(parent, 1) and kv.take_pending_copies() == []
    kv.free(child)
    assert kv.can_allocate(parent, 1) and kv.allocate(parent, 1)  # sole holder: in place
    assert kv.take_pending_copies() == []


def test_copy_kv_blocks_copies_values_and_scales():
    shape = (6, 4, 2, 3)
    caches = [LayerCache(torch.randn(shape), torch.randn(shape), torch.randn(6, 4, 2),
                         torch.randn(6, 4, 2)) for _ in range(2)]
    before = [[t.clone() for t in (c.k, c.v, c.k_scale, c.v_scale)] for c in caches]
    copy_kv_blocks(caches, [(1, 4), (2, 0)])
    for c, old in zip(caches, before):
        for t, o in zip((c.k, c.v, c.k_scale, c.v_scale), old):
            assert torch.equal(t[4], o[1]) and torch.equal(t[0], o[2])
            assert torch.equal(t[[1, 2, 3, 5]], o[[1, 2, 3, 5]])

"""The paged KV cache: a preallocated pool of fixed-size blocks, per-sequence block tables,
reference counts, and prefix caching by chained block hashes with LRU eviction.

Prefix caching. Every *full* block is named by a hash chained over the whole prefix up to
and including it: h_i = hash((h_{i-1}, tokens of block i)). Two sequences with the same
first k blocks of tokens produce the same k hashes, so a dict hash -> block finds the
longest cached prefix in one pass over the new prompt's blocks. A block is registered as
soon as it is allocated for tokens that fill it (their K/V are written in the same step,
before any later reader runs), so siblings scheduled in the same step already share it.
Freed blocks keep their hash and stay findable until the allocator reuses them; the free
list is ordered least-recently-freed first, and sequences free their blocks tail first, so
the deepest (least shared) blocks of a prefix are evicted before its root."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import torch

from peregrine.attention_backend import LayerCache
from peregrine.engine.sequence import Sequence
# the engine's KV sizing lives in the shared memory model (re-exported for callers here)
from peregrine.memory_model import first_live_block, kv_dtype_bytes, num_blocks_for_memory
from peregrine.models.config import ModelConfig

NULL_BLOCK = -1  # a block-table entry whose block was freed (out of the sliding window)


class KVCacheManager:
    """Hands out blocks of the pool to sequences and tracks which prefixes are cached."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None, watermark: float = 0.01) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        # With a sliding window, blocks that leave the window are freed, so a cached prefix
        # may have holes; prefix caching is switched off for such models.
        self.enable_prefix_caching = enable_prefix_caching and sliding_window is None
        self.sliding_window = sliding_window
        self.watermark_blocks = int(watermark * num_blocks)
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which were found
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) block copies to run

    # --- queries ------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no live sequence holds (cached ones included: they are evictable)."""
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prefix cache ---------------------------------------------------------------------------
    def _update_hashes(self, seq: Sequence, num_tokens: int) -> None:
        """Extend seq.block_hashes to every full block among its first num_tokens tokens."""
        bs = self.block_size
        hashes = seq.block_hashes
        for i in range(len(hashes), num_tokens // bs):
            # The chain starts from the adapter's name: K/V computed under one adapter
            # (or none) are never another's.
            parent = hashes[-1] if hashes else seq.request.lora_name
            hashes.append(hash((parent, tuple(seq.token_ids[i * bs:(i + 1) * bs]))))

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks of the longest prefix of `seq` (full blocks, leaving at least the
        last token to compute so the step has logits to sample from)."""
        if not self.enable_prefix_caching:
            return []
        limit = seq.num_tokens - 1
        self._update_hashes(seq, limit)
        hits = []
        for h in seq.block_hashes[:limit // self.block_size]:
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    # --- allocation -----------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_new_tokens: int, hits: Iterable[int] = (),
                     reserve: int = 0) -> bool:
        """Whether `allocate` would succeed, keeping `reserve` blocks free afterwards."""
        hits = list(hits)
        end = seq.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        need = self.blocks_needed(end) - len(seq.block_table) - len(hits)
        revived = sum(1 for b in hits if self.ref_counts[b] == 0)
        copy = 1 if num_new_tokens and self._shared_partial_block(seq) is not None else 0
        return max(need, 0) + revived + copy + reserve <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, hits: Iterable[int] = (),
                 reserve: int = 0) -> bool:
        """Give `seq` blocks for `num_new_tokens` more tokens (after taking the prefix-cache
        `hits`, which advance seq.num_computed_tokens). False, changing nothing, if the pool
        cannot spare them."""
        hits = list(hits)
        if not self.can_allocate(seq, num_new_tokens, hits, reserve):
            return False
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
        seq.num_computed_tokens += len(hits) * self.block_size
        if num_new_tokens:
            self._copy_on_write(seq)
        end = seq.num_computed_tokens + num_new_tokens
        while len(seq.block_table) < self.blocks_needed(end):
            seq.block_table.append(self._take_free_block())
        if self.enable_prefix_caching:
            # Only real tokens are hashed: slots reserved for draft tokens never are.
            self._register_full_blocks(seq, min(end, seq.num_tokens))
        return True

    def trim(self, seq: Sequence) -> None:
        """Free the blocks past the ones seq's tokens need (slots of rejected draft tokens)."""
        keep = self.blocks_needed(seq.num_tokens)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            if block != NULL_BLOCK:
                self._release(block)

    def _take_free_block(self) -> int:
        """Pop the least recently freed block, evicting the prefix it cached."""
        block, _ = self.free_blocks.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:
            del self.cached[h]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def _register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        self._update_hashes(seq, num_tokens)
        full = num_tokens // self.block_size
        for i in range(seq.num_registered_blocks, full):
            block, h = seq.block_table[i], seq.block_hashes[i]
            if self.block_hash[block] is None and h not in self.cached:
                self.block_hash[block] = h
                self.cached[h] = block
        seq.num_registered_blocks = max(seq.num_registered_blocks, full)

    # --- forks (beam search) ----------------------------------------------------------------------
    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let `child` share every block of `parent` (reference counts go up). A shared block
        that is only partly filled is copied when either sequence next writes to it."""
        for block in parent.block_table:
            if block != NULL_BLOCK:
                self.ref_counts[block] += 1
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_registered_blocks = parent.num_registered_blocks

    def _shared_partial_block(self, seq: Sequence) -> int | None:
        """Index in seq's block table of the block its next token goes into, if that block
        already holds tokens and another sequence shares it (it must be copied first)."""
        pos = seq.num_computed_tokens
        i = pos // self.block_size
        if pos % self.block_size == 0 or i >= len(seq.block_table):
            return None
        block = seq.block_table[i]
        return i if block != NULL_BLOCK and self.ref_counts[block] > 1 else None

    def _copy_on_write(self, seq: Sequence) -> None:
        """Give `seq` its own copy of a shared partial block before it writes into it."""
        i = self._shared_partial_block(seq)
        if i is None:
            return
        src = seq.block_table[i]
        dst = self._take_free_block()
        self.ref_counts[src] -= 1  # still >= 1: the other sharers keep it
        seq.block_table[i] = dst
        self.pending_copies.append((src, dst))

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """The block copies copy-on-write scheduled since the last call (run them before the
        forward pass that writes into the copies)."""
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def free(self, seq: Sequence) -> None:
        """Release all of `seq`'s blocks (tail first, so shared roots are evicted last)."""
        for block in reversed(seq.block_table):
            if block != NULL_BLOCK:
                self._release(block)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} freed twice"
        if self.ref_counts[block] == 0:
            if self.block_hash[block] is None:
                # Nothing to reuse: put it first in line for the next allocation.
                self.free_blocks[block] = None
                self.free_blocks.move_to_end(block, last=False)
            else:
                self.free_blocks[block] = None

    def free_out_of_window(self, seq: Sequence) -> None:
        """Free blocks no future query of a sliding-window sequence can attend to."""
        if self.sliding_window is None:
            return
        for i in range(first_live_block(seq.num_computed_tokens, self.sliding_window,
                                        self.block_size)):
            if seq.block_table[i] != NULL_BLOCK:
                self._release(seq.block_table[i])
                seq.block_table[i] = NULL_BLOCK

    # --- invariants -----------------------------------------------------------------------------
    def check_invariants(self, live: Iterable[Sequence]) -> None:
        """Assert that reference counts equal the references live block tables hold, and
        that every unreferenced block is in the free list (cached ones with refcount 0)."""
        expected = [0] * self.num_blocks
        for seq in live:
            for block in seq.block_table:
                if block != NULL_BLOCK:
                    expected[block] += 1
        assert expected == self.ref_counts, "reference counts disagree with block tables"
        for block in range(self.num_blocks):
            in_free = block in self.free_blocks
            assert in_free == (self.ref_counts[block] == 0), f"block {block} misfiled"
        for h, block in self.cached.items():
            assert self.block_hash[block] == h, f"cache entry of block {block} is stale"


def copy_kv_blocks(kv_caches: list[LayerCache], copies: list[tuple[int, int]]) -> None:
    """Copy whole blocks (K, V and any scales) src -> dst in every layer of the pool."""
    if not copies:
        return
    device = kv_caches[0].k.device
    src = torch.tensor([s for s, _ in copies], device=device)
    dst = torch.tensor([d for _, d in copies], device=device)
    for cache in kv_caches:
        for t in (cache.k, cache.v, cache.k_scale, cache.v_scale):
            if t is not None:
                t[dst] = t[src]
